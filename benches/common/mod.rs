//! Test data shared by the benches (and `tests/alloc.rs`): a deterministic PRNG and
//! route tables with realistic prefix lengths.
#![allow(dead_code)] // each including target uses a different part

use switchyard::core::route::RouteTable;

/// Prefix lengths (digits) with their weights out of 10,000.
pub const LENGTH_WEIGHTS: [(usize, u64); 8] = [
    (4, 5),
    (5, 50),
    (6, 5_000),
    (7, 500),
    (8, 3_545),
    (9, 400),
    (10, 300),
    (11, 200),
];

/// Marsaglia's xorshift64: deterministic, no dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// ASCII digits, the first one 1..=9.
    pub fn digits(&mut self, out: &mut [u8]) {
        for (i, slot) in out.iter_mut().enumerate() {
            let d = if i == 0 {
                1 + self.below(9)
            } else {
                self.below(10)
            };
            *slot = b'0' + d as u8;
        }
    }
}

pub fn prefix_length(rng: &mut XorShift) -> usize {
    let mut r = rng.below(10_000);
    for (len, weight) in LENGTH_WEIGHTS {
        if r < weight {
            return len;
        }
        r -= weight;
    }
    unreachable!("weights sum to 10,000")
}

/// A table of `count` distinct PAN prefixes (bank indexes 0..64), and the prefixes.
pub fn route_table(count: usize, seed: u64) -> (RouteTable, Vec<Vec<u8>>) {
    let mut rng = XorShift(seed);
    let mut table = RouteTable::new();
    let mut prefixes = Vec::with_capacity(count);
    let mut buf = [0u8; 11];
    while prefixes.len() < count {
        let len = prefix_length(&mut rng);
        rng.digits(&mut buf[..len]);
        let text = std::str::from_utf8(&buf[..len]).expect("ASCII digits");
        if table.add_prefix(text, (rng.next_u64() % 64) as u16).is_ok() {
            prefixes.push(buf[..len].to_vec());
        }
    }
    (table, prefixes)
}
