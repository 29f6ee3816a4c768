"""A bank host written with pyiso8583 and Python's ssl module that speaks
ISO 8583:1993 natively: an independent check of what the switch sends a 1993
bank behind a 1987 acquirer.

    python pyiso8583_bank.py --certs DIR --dialect iso93-binary --framing u16be

DIR holds ca.pem and bank.pem / bank.key. Listens on 127.0.0.1 (a free port,
printed as "listening PORT" once ready), serves connections one at a time until
the switch closes them, and answers:

  1804 (sign-on 801, sign-off 802, echo 831)  1814 with action code 800
  1200 (DE24 200, DE12 YYMMDDhhmmss)          1210: 000, or 116 when DE4 ends in 51
  1400 / 1420 (DE24 400, DE56 naming a 1200   1410 / 1430 with 400
  this bank approved, by the STAN it saw)

Every request is checked as a 1993 host would (MTI version digit 1, function
code, DE12 n12 with a plausible date, no 1987-only fields, DE56's layout and
the original it names); a mismatch is printed as "ERROR ..." and answered 904
(format error). Each message handled is printed as one line. Stops after
--idle-s seconds without a connection (bounded), or when stdin closes.
Driven by tests/pyiso8583.rs.
"""

import argparse
import pathlib
import select
import socket
import ssl
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from pyiso8583_client import frame, read_frame  # noqa: E402
from pyiso8583_vectors import load, spec_of  # noqa: E402

import iso8583  # noqa: E402

FUNCTION = {"801": "sign-on", "802": "sign-off", "831": "echo"}


def check_request(m, approved):
    """Problems a 1993 host finds in request `m` ([] when none)."""
    problems = []
    mti = m.get("t", "")
    if not mti.startswith("1"):
        problems.append(f"MTI {mti} is not ISO 8583:1993")
    for n in ("13", "70", "90"):
        # 1993 DE13 is the effective date, DE70 a country code, DE90 a count:
        # the 1987 meanings must not leak through.
        if n in m:
            problems.append(f"DE{n} present ({m[n]!r}): a 1987 field leaked")
    if mti[1:3] in ("20", "40", "42") and len(m.get("12", "")) != 12:
        problems.append(f"DE12 {m.get('12')!r} is not YYMMDDhhmmss")
    if "12" in m:
        mm, dd = int(m["12"][2:4]), int(m["12"][4:6])
        if not (1 <= mm <= 12 and 1 <= dd <= 31):
            problems.append(f"DE12 {m['12']} is not a date")
    want = {"12": "200", "14": "400", "80": None}.get(mti[1:3])
    if mti[1:3] == "80":
        if m.get("24") not in FUNCTION:
            problems.append(f"1804 function code {m.get('24')!r}")
    elif want and m.get("24") != want:
        problems.append(f"DE24 {m.get('24')!r}, expected {want}")
    if mti[1] == "4":
        de56 = m.get("56", "")
        if len(de56) < 22:
            problems.append(f"DE56 {de56!r} too short")
        else:
            original = (de56[:4], de56[4:10])
            if original[0] != "1200":
                problems.append(f"DE56 names MTI {original[0]}")
            if original[1] not in approved:
                problems.append(f"DE56 names STAN {original[1]}, not one this bank approved")
            elif approved[original[1]] != de56[10:22]:
                problems.append(
                    f"DE56 local date and time {de56[10:22]}, the original had {approved[original[1]]}"
                )
            ll = int(de56[22:24] or "0")
            if len(de56) != 24 + ll:
                problems.append(f"DE56 acquirer length {ll} does not match")
    return problems


def answer_to(m, approved):
    mti = m["t"]
    problems = check_request(m, approved)
    out = {"t": mti[:2] + str(int(mti[2]) + 1) + mti[3], "11": m.get("11", "000000")}
    for n in ("2", "3", "4", "7", "12", "24", "32", "37", "41", "42", "49", "56"):
        if n in m:
            out[n] = m[n]
    if problems:
        out["39"] = "904"
    elif mti[1] == "8":
        out["39"] = "800"
    elif mti[1] == "4":
        out["39"] = "400"
    elif m.get("4", "").endswith("51"):
        out["39"] = "116"
    else:
        out["39"] = "000"
        approved[m["11"]] = m.get("12", "")
    if mti[1] != "8":
        out.pop("24", None)
    if mti[1] != "4":
        out.pop("56", None)
    return out, problems


def serve(conn, framing, spec, approved):
    while True:
        try:
            raw = read_frame(conn, framing)
        except SystemExit:
            return  # the switch closed the link
        m, _ = iso8583.decode(bytearray(raw), spec)
        answer, problems = answer_to(m, approved)
        what = FUNCTION.get(m.get("24"), "") if m["t"][1] == "8" else ""
        print(f"{m['t']} {what} DE11={m.get('11')} -> {answer['t']} {answer['39']}".replace("  ", " "))
        for p in problems:
            print(f"ERROR {m['t']} DE11={m.get('11')}: {p}")
        sys.stdout.flush()
        body, _ = iso8583.encode(answer, spec)
        conn.sendall(frame(framing, bytes(body)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--certs", required=True)
    p.add_argument("--dialect", required=True)
    p.add_argument("--framing", default="u16be")
    p.add_argument("--idle-s", type=float, default=60)
    a = p.parse_args()
    spec = spec_of(load(a.dialect))
    certs = pathlib.Path(a.certs)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(certs / "bank.pem"), str(certs / "bank.key"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    print(f"listening {listener.getsockname()[1]}")
    sys.stdout.flush()
    approved = {}
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], a.idle_s)
        if not ready or sys.stdin in ready:
            return  # idle too long, or the test is done
        raw, _ = listener.accept()
        raw.settimeout(a.idle_s)
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            print(f"handshake failed: {e}")
            continue
        try:
            serve(conn, a.framing, spec, approved)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main()
