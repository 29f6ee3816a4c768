//! Bank host simulator.
