"""psec (PyPI, pinned in .ci/oracle-venv) as an independent implementation of
TR-31 key blocks, versions B and D.

    python tr31_check.py CASES.txt

CASES.txt (written by crates/security/tests/tr31_psec.rs) has one case a line,
fields one space apart:

    kbpk_hex key_hex version usage algorithm mode key_version exportability blocks ours

`blocks` is `-` or `ID=DATA` pairs joined by `,`; `ours` is the key block our
wrap made. For each case this script unwraps ours with psec (same key, same
header fields and optional blocks), then wraps the same key and header with
psec and prints that block, one a line, for the Rust side to unwrap. Exit 1 on
the first difference.
"""

import sys

import psec


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def main():
    for n, line in enumerate(open(sys.argv[1]).read().splitlines(), 1):
        kbpk_hex, key_hex, version, usage, alg, mode, kv, exp, blocks, ours = line.split(" ")
        kbpk, key = bytes.fromhex(kbpk_hex), bytes.fromhex(key_hex)
        want_blocks = {}
        if blocks != "-":
            for pair in blocks.split(","):
                bid, data = pair.split("=", 1)
                want_blocks[bid] = data
        try:
            header, got = psec.tr31.unwrap(kbpk, ours)
        except Exception as e:  # noqa: BLE001 - any refusal is a difference
            fail(f"case {n}: psec refuses our block {ours}: {e}")
        if got != key:
            fail(f"case {n}: psec unwrapped {got.hex()} from our block {ours}, expected {key_hex}")
        fields = (header.version_id, header.key_usage, header.algorithm, header.mode_of_use,
                  header.version_num, header.exportability)
        if fields != (version, usage, alg, mode, kv, exp):
            fail(f"case {n}: psec read header {fields} from {ours}")
        if dict(header.blocks) != want_blocks:
            fail(f"case {n}: psec read optional blocks {dict(header.blocks)} from {ours}")
        h = psec.tr31.Header(version, usage, alg, mode, kv, exp)
        for bid, data in want_blocks.items():
            h.blocks[bid] = data
        print(psec.tr31.wrap(kbpk, h, key))


if __name__ == "__main__":
    main()
