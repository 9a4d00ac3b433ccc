"""Prints each execve the audit log at argv[1] holds, as one JSON line {"pid": ..., "argv": [...]}.

Run by Debian's /usr/bin/python3, which has the auparse bindings (package python3-audit); the
venvs do not see them. auparse decodes the hex-encoded arguments; a long argument comes in
pieces (a1_len=..., a1[0]=..., a1[1]=... across several EXECVE records), joined here."""

import json
import re
import sys

import auparse

PIECE = re.compile(r"a(\d+)\[\d+\]")
WHOLE = re.compile(r"a(\d+)")


def execs(log: str):
    parser = auparse.AuParser(auparse.AUSOURCE_FILE, log)
    parser.set_escape_mode(auparse.AUPARSE_ESC_RAW)  # the argument's own characters, unescaped
    while parser.parse_next_event():
        pid, args = None, {}
        while True:
            kind = parser.get_type_name()
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
                        args[index] = args.get(index, "") + parser.interpret_field()
                    if not parser.next_field():
                        break
            if not parser.next_record():
                break
        if args:
            yield {"pid": pid, "argv": [args[i] for i in sorted(args)]}


if __name__ == "__main__":
    for record in execs(sys.argv[1]):
        print(json.dumps(record))
