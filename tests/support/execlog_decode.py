"""Prints each execve the audit log at argv[1] holds, as one JSON line {"pid": ..., "argv": [HEX, ...]}.

Run by Debian's /usr/bin/python3, which has the auparse bindings (package python3-audit); the
venvs do not see them. auparse finds the records and fields; each argument's raw value is audit's
own encoding (printable ones quoted, any other hex-encoded), turned back into its bytes here, not
through auparse's interpretation, which decodes as UTF-8 and fails on an argument that is not.
A long argument comes in pieces (a1_len=..., a1[0]=..., a1[1]=... across several EXECVE records),
joined here. Arguments travel as hex: bytes, exactly."""

import json
import re
import sys

import auparse

PIECE = re.compile(r"a(\d+)\[\d+\]")
WHOLE = re.compile(r"a(\d+)")


def raw_bytes(value: str) -> bytes:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].encode()
    if value == "(null)":
        return b""
    return bytes.fromhex(value)


def execs(log: str):
    parser = auparse.AuParser(auparse.AUSOURCE_FILE, log)
    while parser.parse_next_event():
        pid, args = None, {}
        while True:
            try:
                kind = parser.get_type_name()
            except LookupError:  # a record type this auparse has no name for (the VM's kernel sends some): not ours
                kind = None
            if kind == "SYSCALL":
                parser.first_field()
                if parser.find_field("pid"):
                    pid = int(parser.get_field_str())
            elif kind == "EXECVE":
                parser.first_field()
                while True:
                    name = parser.get_field_name()
                    match = PIECE.fullmatch(name) or WHOLE.fullmatch(name)
                    if match:
                        index = int(match[1])
                        args[index] = args.get(index, b"") + raw_bytes(parser.get_field_str())
                    if not parser.next_field():
                        break
            if not parser.next_record():
                break
        if args:
            yield {"pid": pid, "argv": [args[i].hex() for i in sorted(args)]}


if __name__ == "__main__":
    for record in execs(sys.argv[1]):
        print(json.dumps(record))
