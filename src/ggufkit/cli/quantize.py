"""`ggufkit quantize` (placeholder until its issue lands)."""


def add_parser(sub):
    p = sub.add_parser("quantize", help="(not yet available)")
    p.set_defaults(func=lambda args: 2)
