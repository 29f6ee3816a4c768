"""Golden vectors from pyiso8583, an independent ISO 8583 implementation.

Builds a pyiso8583 specification from each shipped dialect file
(config/iso8583/*.toml) and encodes a fixed set of messages with it.

    python pyiso8583_vectors.py generate OUT_DIR    write OUT_DIR/<dialect>.json
    python pyiso8583_vectors.py check VECTOR_DIR    regenerate; exit 1 on any difference
    python pyiso8583_vectors.py decode FILE         decode the wire messages in FILE
                                                    (JSON written by our encoder) and
                                                    compare them with its fields

The vectors are committed (crates/wire/tests/vectors) and read by
crates/wire/tests/golden.rs; crates/wire/tests/pyiso8583.rs runs `check` and
`decode` against the pinned pyiso8583 in the oracle virtual environment.
"""

import json
import pathlib
import sys
try:
    import tomllib
except ImportError:  # Python before 3.11: the same parser from PyPI
    import tomli as tomllib

import ebcdic  # noqa: F401  registers the cp1047 codec
import iso8583

ROOT = pathlib.Path(__file__).resolve().parents[4]
DIALECTS = [
    "iso87-ascii", "iso87-hexbitmap", "iso87-binary", "iso87-ebcdic", "iso93-ascii", "iso93-binary",
]


def load(name):
    return tomllib.loads((ROOT / "config" / "iso8583" / f"{name}.toml").read_text())


def spec_of(d):
    cp = d.get("code_page", "cp1047")
    text = {"ascii": "ascii", "ebcdic": cp}
    spec = {"h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0}}
    mti = d["mti_encoding"]
    spec["t"] = {
        "data_enc": "b" if mti == "bcd" else text[mti],
        "len_enc": "ascii",
        "len_type": 0,
        "max_len": 2 if mti == "bcd" else 4,
    }
    bitmap = {
        "binary": {"data_enc": "b", "max_len": 8},
        "hex": {"data_enc": "ascii", "max_len": 16},
        "hex-ebcdic": {"data_enc": cp, "max_len": 16},
    }[d["bitmap_encoding"]]
    for key in ("p", "1"):
        spec[key] = dict(bitmap, len_enc="ascii", len_type=0)
    for f in d["field"]:
        n = f["number"]
        if n == 1:
            continue
        prefix = f.get("length_prefix_encoding", d["length_prefix_encoding"])
        digits = {"fixed": 0, "llvar": 2, "lllvar": 3}[f["length"]]
        packed = {0: 0, 2: 1, 3: 2}[digits]
        len_enc, len_type = {
            "ascii": ("ascii", digits),
            "ebcdic": (cp, digits),
            "bcd": ("bcd", packed),
            "binary": ("b", packed),
        }[prefix]
        s = {"len_enc": len_enc, "len_type": len_type, "max_len": f["max"]}
        enc = f["encoding"]
        if enc == "bcd":
            counts = f.get("length_counts", d.get("length_counts", "digits"))
            pad_side = f.get("bcd_pad", d.get("bcd_pad", "left"))
            filler = f.get("bcd_filler", d.get("bcd_filler", "0"))
            s["data_enc"] = "b"
            s["len_count"] = "nibbles" if counts == "digits" else "bytes"
            s[f"{pad_side}_pad"] = filler
        elif enc == "binary":
            s["data_enc"] = "b"
        elif enc == "hex":
            # ASCII hex characters; variable hex fields count bytes, which
            # pyiso8583 cannot say, so the samples use fixed ones only.
            s["data_enc"] = "ascii"
            s["max_len"] = 2 * f["max"]
        else:
            s["data_enc"] = text[enc]
        spec[str(n)] = s
    return spec


# Field values as the switch holds them: text as characters, type b as hex.
MESSAGES = [
    ("0200 purchase, 16-digit PAN, EMV data", {
        "t": "0200", "2": "4111111111111111", "3": "000000", "4": "000000012345",
        "7": "1130120000", "11": "000123", "12": "120000", "13": "1130",
        "22": "051", "32": "100001", "35": "4111111111111111D25121010000000000",
        "37": "123456789012", "41": "TERM[01]", "42": "MERCHANT0000001",
        "43": "Shop ^1! | Main St [Town]".ljust(40), "49": "978",
        "52": "0123456789ABCDEF", "55": "9F02060000000123455F2A020978",
        "100": "200001",
    }),
    ("0210 approval, 19-digit PAN", {
        "t": "0210", "2": "4111111111111111111", "3": "000000", "4": "000000012345",
        "7": "1130120000", "11": "000123", "32": "100001", "37": "123456789012",
        "38": "A1B2C3", "39": "00", "41": "TERM[01]", "49": "978",
    }),
    ("0210 decline", {
        "t": "0210", "3": "000000", "4": "000000012345", "7": "1130120000",
        "11": "000124", "32": "100001", "37": "123456789013", "39": "51",
        "49": "978",
    }),
    ("0800 echo", {"t": "0800", "7": "1130120000", "11": "000001", "70": "301"}),
    ("0810 echo answer", {
        "t": "0810", "7": "1130120000", "11": "000001", "39": "00", "70": "301",
    }),
    ("0420 reversal advice", {
        "t": "0420", "2": "4111111111111111", "3": "000000", "4": "000000012345",
        "7": "1130120500", "11": "000125", "32": "100001", "37": "123456789012",
        "39": "68", "49": "978",
        "90": "020000012311301200000000100001000000000000",
    }),
]


# The same exchanges in ISO 8583:1993 (1993 MTIs, DE12 n12, DE22 an12, DE24
# function codes, DE39 action codes, DE56 original data elements).
MESSAGES_1993 = [
    ("1200 purchase, 16-digit PAN, EMV data", {
        "t": "1200", "2": "4111111111111111", "3": "000000", "4": "000000012345",
        "7": "1130120000", "11": "000123", "12": "261130120000", "14": "2712",
        "22": "A10101A5500C", "24": "200", "32": "100001",
        "35": "4111111111111111D25121010000000000", "37": "123456789012",
        "41": "TERM[01]", "42": "MERCHANT0000001",
        "43": "Shop ^1! | Main St [Town]", "49": "978",
        "52": "0123456789ABCDEF", "55": "9F02060000000123455F2A020978",
        "100": "200001",
    }),
    ("1210 approval, 19-digit PAN", {
        "t": "1210", "2": "4111111111111111111", "3": "000000", "4": "000000012345",
        "7": "1130120000", "11": "000123", "32": "100001", "37": "123456789012",
        "38": "A1B2C3", "39": "000", "41": "TERM[01]", "49": "978",
    }),
    ("1210 decline", {
        "t": "1210", "3": "000000", "4": "000000012345", "7": "1130120000",
        "11": "000124", "32": "100001", "37": "123456789013", "39": "116",
        "49": "978",
    }),
    ("1804 echo", {"t": "1804", "7": "1130120000", "11": "000001", "24": "831"}),
    ("1814 echo answer", {
        "t": "1814", "7": "1130120000", "11": "000001", "24": "831", "39": "800",
    }),
    ("1420 reversal advice", {
        "t": "1420", "2": "4111111111111111", "3": "000000", "4": "000000012345",
        "7": "1130120500", "11": "000125", "12": "261130120000", "24": "400",
        "25": "4021", "32": "100001", "37": "123456789012", "39": "911", "49": "978",
        "56": "1200000123261130120000" + "06100001",
    }),
]


def sample(d, fields):
    """The message as this dialect can carry it (hex dialects: no variable b)."""
    by_number = {f["number"]: f for f in d["field"]}
    out = {}
    for k, v in fields.items():
        f = by_number.get(int(k)) if k != "t" else None
        if f and f["encoding"] == "hex" and f["length"] != "fixed":
            continue
        out[k] = v
    return out


def vectors(name):
    d = load(name)
    spec = spec_of(d)
    msgs = []
    for title, fields in (MESSAGES_1993 if d.get("version") == "1993" else MESSAGES):
        doc = sample(d, fields)
        raw, _ = iso8583.encode(dict(doc), spec)
        msgs.append({"name": title, "fields": doc, "wire": bytes(raw).hex()})
    return {
        "dialect": name,
        "generator": f"pyiso8583 {iso8583.__version__}",
        "messages": msgs,
    }


def main():
    cmd, path = sys.argv[1], pathlib.Path(sys.argv[2])
    if cmd == "generate":
        path.mkdir(parents=True, exist_ok=True)
        for name in DIALECTS:
            (path / f"{name}.json").write_text(json.dumps(vectors(name), indent=1) + "\n")
    elif cmd == "check":
        bad = 0
        for name in DIALECTS:
            committed = json.loads((path / f"{name}.json").read_text())
            fresh = vectors(name)
            for a, b in zip(committed["messages"], fresh["messages"]):
                if a != b:
                    bad += 1
                    print(f"{name}: {a['name']}: committed vector differs from pyiso8583")
            if len(committed["messages"]) != len(fresh["messages"]):
                bad += 1
                print(f"{name}: message count differs")
        sys.exit(1 if bad else 0)
    elif cmd == "decode":
        doc = json.loads(path.read_text())
        bad = 0
        for m in doc["messages"]:
            spec = spec_of(load(m["dialect"]))
            decoded, _ = iso8583.decode(bytearray.fromhex(m["wire"]), spec)
            decoded.pop("p", None)
            decoded.pop("1", None)
            want = {k: v.upper() if k in m.get("binary", []) else v for k, v in m["fields"].items()}
            got = {k: v.upper() if k in m.get("binary", []) else v for k, v in decoded.items()}
            if got != want:
                bad += 1
                print(f"{m['dialect']}: {m['name']}: pyiso8583 decoded {got}, expected {want}")
        print(f"pyiso8583 decoded {len(doc['messages'])} messages, {bad} differed")
        sys.exit(1 if bad else 0)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
