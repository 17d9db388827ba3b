"""`openlora settle --now`: build and send a settlement batch now and wait for it to confirm."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("settle", help="settle receipts on chain", description=(
        "Settle unsettled receipts on chain now (the running node also does this on a schedule). "
        "Safe to run next to the node and after a crash: a batch the chain has is never sent again."))
    p.add_argument("--now", action="store_true", required=True, help="settle now and wait for confirmation")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for confirmations")
    p.set_defaults(func=_settle)


def _settle(args, settings) -> int:
    from node.accounting import build_money, close_money

    money = build_money(settings, start_background=False)
    try:
        states = money.settler.settle_now(timeout_s=args.timeout)
    finally:
        close_money(money)
    if not states:
        print("nothing to settle")
        return 0
    for batch_id, state in states.items():
        print(f"{batch_id} {state}")
    return 0 if all(s == "confirmed" for s in states.values()) else 1
