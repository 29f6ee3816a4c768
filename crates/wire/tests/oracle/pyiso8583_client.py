"""An acquirer written with pyiso8583 and Python's ssl module: an independent
client of switchyard over mutual TLS, in any shipped dialect, framing and
header.

    python pyiso8583_client.py --addr 127.0.0.1:PORT --certs DIR --institution 100001 \
        --dialect iso87-binary --framing bcd2 [--tpdu]

DIR holds ca.pem and <institution>.pem / <institution>.key. Sends a purchase
that is approved, one that is declined (amount ending 51), an echo, a
reversal of the first, and a purchase no route serves (the switch's own 92);
checks each answer (MTI, DE39, the STAN echoed, the TPDU sent back with its
addresses swapped) and exits 1 on the first mismatch.
A dialect with version = "1993" is spoken as ISO 8583:1993 (1200, 1804, 1420;
action codes), which the switch translates to and from its 1987 form.
Driven by tests/pyiso8583_client.rs.
"""

import argparse
import pathlib
import socket
import ssl
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from pyiso8583_vectors import load, spec_of  # noqa: E402

import iso8583  # noqa: E402

TPDU = bytes([0x60, 0x00, 0x12, 0x00, 0x34])


def frame(framing, body):
    n = len(body)
    header = {
        "u16be": n.to_bytes(2, "big"),
        "u16be-inclusive": (n + 2).to_bytes(2, "big"),
        "ascii4": b"%04d" % n,
        "hex4": b"%04X" % n,
        "bcd2": bytes.fromhex("%04d" % n),
    }[framing]
    return header + body


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise SystemExit("connection closed by the switch")
        out += chunk
    return out


def read_frame(sock, framing):
    width = {"u16be": 2, "u16be-inclusive": 2, "ascii4": 4, "hex4": 4, "bcd2": 2}[framing]
    h = read_exact(sock, width)
    n = {
        "u16be": lambda: int.from_bytes(h, "big"),
        "u16be-inclusive": lambda: int.from_bytes(h, "big") - 2,
        "ascii4": lambda: int(h.decode()),
        "hex4": lambda: int(h.decode(), 16),
        "bcd2": lambda: int(h.hex()),
    }[framing]()
    return read_exact(sock, n)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--certs", required=True)
    p.add_argument("--institution", default="100001")
    p.add_argument("--dialect", required=True)
    p.add_argument("--framing", default="u16be")
    p.add_argument("--tpdu", action="store_true")
    p.add_argument("--stan", type=int, default=42, help="first DE11; five are used")
    a = p.parse_args()
    dialect = load(a.dialect)
    spec = spec_of(dialect)
    version = dialect.get("version", "1987")
    certs = pathlib.Path(a.certs)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(
        str(certs / f"{a.institution}.pem"), str(certs / f"{a.institution}.key")
    )
    host, port = a.addr.rsplit(":", 1)
    raw_sock = socket.create_connection((host, int(port)), timeout=30)
    sock = ctx.wrap_socket(raw_sock, server_hostname="localhost")

    def exchange(name, fields, mti, code):
        body, _ = iso8583.encode(dict(fields), spec)
        sock.sendall(frame(a.framing, (TPDU if a.tpdu else b"") + bytes(body)))
        raw = read_frame(sock, a.framing)
        if a.tpdu:
            want = TPDU[:1] + TPDU[3:5] + TPDU[1:3]
            if raw[:5] != want:
                raise SystemExit(f"{name}: TPDU {raw[:5].hex()}, expected {want.hex()}")
            raw = raw[5:]
        answer, _ = iso8583.decode(bytearray(raw), spec)
        got = (answer.get("t"), answer.get("39"), answer.get("11"))
        if got != (mti, code, fields["11"]):
            raise SystemExit(f"{name}: answer {got}, expected {(mti, code, fields['11'])}")
        print(f"{a.dialect} {a.framing} tpdu={a.tpdu}: {name}: {mti} {code}")
        return answer

    stan = [f"{(a.stan + i) % 1000000:06d}" for i in range(5)]
    if version == "1993":
        # ISO 8583:1993: DE12 is YYMMDDhhmmss, DE24 the function code, DE39 an
        # action code, DE56 names the original (by its local date and time, which
        # here differs from its transmission date and time, DE7).
        base = {
            "3": "000000", "7": "1130110000", "12": "261130120000", "24": "200",
            "32": a.institution, "37": "532912000001", "41": "TERM0001",
            "42": "MERCHANT0000001", "49": "978",
        }
        approve = dict(base, t="1200", **{"2": "4111111111111111", "4": "000000001000", "11": stan[0]})
        exchange("approve", approve, "1210", "000")
        decline = dict(base, t="1200", **{"2": "5500000000000004", "4": "000000001051", "11": stan[1]})
        exchange("decline", decline, "1210", "116")
        echo = {"t": "1804", "7": "1130110000", "11": stan[2], "24": "831"}
        exchange("echo", echo, "1814", "800")
        acquirer = f"{len(a.institution):02d}{a.institution}"
        de56 = "1200" + stan[0] + "261130120000" + acquirer
        reversal = dict(approve, t="1420", **{"11": stan[3], "24": "400", "56": de56})
        exchange("reversal", reversal, "1430", "400")
        # The switch's own answer, in 1993: no route (92) is action code 908.
        lost = dict(base, t="1200", **{"2": "9111111111111111", "4": "000000001000", "11": stan[4]})
        exchange("no route", lost, "1210", "908")
        return
    base = {
        "3": "000000", "7": "1130120000", "12": "120000", "13": "1130",
        "32": a.institution, "37": "532912000001", "41": "TERM0001",
        "42": "MERCHANT0000001", "49": "978",
    }
    approve = dict(base, t="0200", **{"2": "4111111111111111", "4": "000000001000", "11": stan[0]})
    exchange("approve", approve, "0210", "00")
    decline = dict(base, t="0200", **{"2": "5500000000000004", "4": "000000001051", "11": stan[1]})
    exchange("decline", decline, "0210", "51")
    echo = {"t": "0800", "7": "1130120000", "11": stan[2], "70": "301"}
    exchange("echo", echo, "0810", "00")
    de90 = "0200" + stan[0] + "1130120000" + "00000100001" + "00000000000"
    reversal = dict(approve, t="0400", **{"11": stan[3], "90": de90})
    exchange("reversal", reversal, "0410", "00")
    lost = dict(base, t="0200", **{"2": "9111111111111111", "4": "000000001000", "11": stan[4]})
    exchange("no route", lost, "0210", "92")

if __name__ == "__main__":
    main()
