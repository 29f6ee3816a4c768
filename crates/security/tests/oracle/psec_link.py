"""An acquirer and a bank whose PIN blocks and MACs are made and checked by
psec (and `cryptography` for AES-CMAC), messages by pyiso8583: the independent
side of crates/cli/tests/pin_mac.rs, which runs `switchyard run` between them.

    python psec_link.py make  --dialect D < CASES.json     (hex messages out)
    python psec_link.py check --dialect D < ANSWERS.json   (verdicts out)
    python psec_link.py bank  --dialect D --certs DIR --zpk HEX --format iso0|iso4
                              --zak HEX --mac iso9797-3|aes-cmac

The MAC is the message's last field: DE128 when the message has fields above
64, else DE64, 8 bytes, computed over every byte before it (from the MTI).
ISO 9797-1 algorithm 3 (padding 1) for TDES keys; AES-CMAC's left 8 bytes for
AES keys.

`make` reads cases {fields: {n: text}, pin, pan, zpk, format, zak, mac,
tamper} and writes each message in hex: DE52 enciphered by psec, the MAC by
psec or cryptography, the MAC's last byte flipped when `tamper`.

`check` reads [{message, zak, mac}] and prints per answer its MTI, DE11, DE39
and whether its MAC verifies.

`bank` listens on 127.0.0.1 (prints "listening PORT"), answers 0800 with 0810
00 (no MAC), and every other request with its answer: 00 when its MAC verifies
and its DE52 deciphers (psec) to a PIN, printing "PIN <pin> MAC ok DE37=…";
96 and "ERROR …" otherwise. Its answers carry its MAC. Stops when stdin closes
or after --idle-s without a connection.
"""

import argparse
import json
import pathlib
import select
import socket
import ssl
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "wire" / "tests" / "oracle"))
from pyiso8583_client import frame, read_frame  # noqa: E402
from pyiso8583_vectors import spec_of, tomllib  # noqa: E402

import iso8583  # noqa: E402
import psec  # noqa: E402
from cryptography.hazmat.primitives import cmac  # noqa: E402
from cryptography.hazmat.primitives.ciphers import algorithms  # noqa: E402


def dialect_spec(path):
    return spec_of(tomllib.loads(pathlib.Path(path).read_text()))


def mac_of(key, alg, data):
    if alg == "iso9797-3":
        return psec.mac.generate_retail_mac(key[:8], key[8:16], data, padding=1)
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()[:8]


def mac_field(doc):
    others = [int(n) for n in doc if n.isdigit() and int(n) not in (64, 128)]
    return "128" if any(n > 64 for n in others) else "64"


def encode_maced(doc, spec, key, alg):
    """`doc` encoded with its MAC (key None: no MAC)."""
    if key is not None:
        doc[mac_field(doc)] = "00" * 8
    body, _ = iso8583.encode(doc, spec)
    body = bytes(body)
    if key is None:
        return body
    return body[:-8] + mac_of(key, alg, body[:-8])


def verify_mac(body, doc, key, alg):
    n = "128" if "128" in doc else ("64" if "64" in doc else None)
    if n is None:
        return "missing"
    if bytes.fromhex(doc[n]) != body[-8:]:
        return "not last"
    return "ok" if mac_of(key, alg, body[:-8]) == body[-8:] else "bad"


def encipher_pin(key, fmt, pin, pan):
    if fmt == "iso0":
        return psec.des.encrypt_tdes_ecb(key, psec.pinblock.encode_pinblock_iso_0(pin, pan))
    return psec.pinblock.encipher_pinblock_iso_4(key, pin, pan)


def decipher_pin(key, fmt, block, pan):
    if fmt == "iso0":
        return psec.pinblock.decode_pinblock_iso_0(psec.des.decrypt_tdes_ecb(key, block), pan)
    return psec.pinblock.decipher_pinblock_iso_4(key, block, pan)


def make(spec):
    out = []
    for c in json.load(sys.stdin):
        doc = {"t": c["mti"]}
        doc.update(c["fields"])
        doc["52"] = encipher_pin(bytes.fromhex(c["zpk"]), c["format"], c["pin"], c["pan"]).hex()
        body = encode_maced(doc, spec, bytes.fromhex(c["zak"]), c["mac"])
        if c.get("tamper"):
            body = body[:-1] + bytes([body[-1] ^ 1])
        out.append(body.hex())
    print(json.dumps(out))


def check(spec):
    out = []
    for a in json.load(sys.stdin):
        body = bytes.fromhex(a["message"])
        doc, _ = iso8583.decode(bytearray(body), spec)
        mac = verify_mac(body, doc, bytes.fromhex(a["zak"]), a["mac"])
        out.append({"mti": doc["t"], "stan": doc.get("11"), "code": doc.get("39"), "mac": mac})
    print(json.dumps(out))


def answer(doc, body, a, spec):
    zpk, zak = bytes.fromhex(a.zpk), bytes.fromhex(a.zak)
    mti = doc["t"]
    out = {"t": mti[:2] + str(int(mti[2]) + 1) + mti[3]}
    for n in ("2", "3", "4", "7", "11", "32", "37", "41", "49", "100"):
        if n in doc:
            out[n] = doc[n]
    if mti[1] == "8":
        out["70"] = doc.get("70", "301")
        out["39"] = "00"
        return encode_maced(out, spec, None, None), f"{mti} -> 00"
    problems = []
    mac = verify_mac(body, doc, zak, a.mac)
    if mac != "ok":
        problems.append(f"MAC {mac}")
    pin = None
    if "52" in doc:
        try:
            pin = decipher_pin(zpk, a.format, bytes.fromhex(doc["52"]), doc.get("2", ""))
        except Exception as e:  # psec raises ValueError on a bad block
            problems.append(f"PIN block: {e}")
    out["39"] = "96" if problems else "00"
    line = f"PIN {pin} MAC {mac} DE37={doc.get('37')} {mti}"
    if problems:
        line = f"ERROR DE37={doc.get('37')} {mti}: {'; '.join(problems)}"
    return encode_maced(out, spec, zak, a.mac), line


def bank(spec, a):
    certs = pathlib.Path(a.certs)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(certs / "bank.pem"), str(certs / "bank.key"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    print(f"listening {listener.getsockname()[1]}", flush=True)
    conns = []
    while True:
        ready, _, _ = select.select([listener, sys.stdin] + conns, [], [], a.idle_s)
        if not ready or sys.stdin in ready:
            return
        for r in ready:
            if r is listener:
                raw, _ = listener.accept()
                try:
                    conns.append(ctx.wrap_socket(raw, server_side=True))
                except (ssl.SSLError, OSError) as e:
                    print(f"handshake failed: {e}", flush=True)
                continue
            try:
                body = read_frame(r, "u16be")
            except (SystemExit, ssl.SSLError, OSError):
                conns.remove(r)
                r.close()
                continue
            doc, _ = iso8583.decode(bytearray(body), spec)
            reply, line = answer(doc, body, a, spec)
            print(line, flush=True)
            r.sendall(frame("u16be", reply))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["make", "check", "bank"])
    p.add_argument("--dialect", required=True)
    p.add_argument("--certs")
    p.add_argument("--zpk")
    p.add_argument("--format")
    p.add_argument("--zak")
    p.add_argument("--mac")
    p.add_argument("--idle-s", type=float, default=60)
    a = p.parse_args()
    spec = dialect_spec(a.dialect)
    if a.mode == "make":
        make(spec)
    elif a.mode == "check":
        check(spec)
    else:
        bank(spec, a)


if __name__ == "__main__":
    main()
