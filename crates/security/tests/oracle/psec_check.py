"""psec (PyPI, pinned) as an independent implementation of ISO 9564 PIN
blocks, ISO 9797-1 MAC algorithm 3 and TDES key check values; `cryptography`
(psec's own dependency) for AES-CMAC, which psec lacks.

    python psec_check.py CASES.json

CASES.json (written by tests/psec.rs) lists cases with hex keys, PINs, PANs,
data and OUR outputs. For each case this script checks our output with psec
(deciphers our PIN blocks to the PIN, recomputes MACs and KCVs) and makes its
own PIN block for the same PIN, which it prints as JSON for the Rust side to
decipher. Exit 1 on the first difference.
"""

import json
import sys

import psec
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def main():
    cases = json.load(open(sys.argv[1]))
    made = []
    for c in cases:
        key = bytes.fromhex(c["key"])
        kind = c["kind"]
        if kind == "pin":
            fmt, pin, pan, ours = c["format"], c["pin"], c["pan"], bytes.fromhex(c["ours"])
            if fmt == "iso0":
                got = psec.pinblock.decode_pinblock_iso_0(psec.des.decrypt_tdes_ecb(key, ours), pan)
                theirs = psec.des.encrypt_tdes_ecb(key, psec.pinblock.encode_pinblock_iso_0(pin, pan))
            elif fmt == "iso3":
                got = psec.pinblock.decode_pinblock_iso_3(psec.des.decrypt_tdes_ecb(key, ours), pan)
                theirs = psec.des.encrypt_tdes_ecb(key, psec.pinblock.encode_pinblock_iso_3(pin, pan))
            elif fmt == "iso4":
                got = psec.pinblock.decipher_pinblock_iso_4(key, ours, pan)
                theirs = psec.pinblock.encipher_pinblock_iso_4(key, pin, pan)
            else:
                fail(f"unknown format {fmt}")
            if got != pin:
                fail(f"{fmt}: psec read PIN {got!r} from our block {ours.hex()}, expected {pin!r}")
            made.append({"format": fmt, "key": c["key"], "pin": pin, "pan": pan, "block": theirs.hex()})
        elif kind == "retail-mac":
            data = bytes.fromhex(c["data"])
            want = psec.mac.generate_retail_mac(key[:8], key[8:16], data, padding=1)
            if want.hex().upper() != c["ours"].upper():
                fail(f"retail MAC of {c['data']}: psec {want.hex()}, ours {c['ours']}")
        elif kind == "aes-cmac":
            data = bytes.fromhex(c["data"])
            m = cmac.CMAC(algorithms.AES(key))
            m.update(data)
            want = m.finalize()
            if want.hex().upper() != c["ours"].upper():
                fail(f"AES-CMAC of {c['data']}: cryptography {want.hex()}, ours {c['ours']}")
        elif kind == "kcv":
            want = psec.des.generate_kcv(key, 3)
            if want.hex().upper() != c["ours"].upper():
                fail(f"KCV of a key: psec {want.hex()}, ours {c['ours']}")
        else:
            fail(f"unknown case {kind}")
    print(json.dumps(made))


if __name__ == "__main__":
    main()
