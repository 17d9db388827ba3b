"""The contract suites about hostile parties, run through forge: a re-entering token / payee
(contracts/test/Reentrancy.t.sol) and a malicious payee (contracts/test/MaliciousPayee.t.sol). Recorded
in the reliability table; the long invariant run is `make -C contracts invariant-long`."""

from __future__ import annotations

import re
import subprocess

from harness import ROOT, record

FORGE = ROOT / "node_modules" / ".bin" / "forge"


def test_reentering_token_and_malicious_payee_cannot_move_funds_they_do_not_own():
    r = subprocess.run([str(FORGE), "test", "--use", "./tools/solc", "--match-path", "test/{Reentrancy,MaliciousPayee}.t.sol"],
                       cwd=ROOT / "contracts", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = re.findall(r"\[PASS\] (\w+)\(", r.stdout)
    assert {"test_claimCannotBeReentered", "test_maliciousPayeeGetsExactlyItsCreditAndNothingElse",
            "test_payeeThatRefusesPaymentBlocksNobodyAndKeepsItsCredit", "test_payeeCannotSettleOrReplayBatches"} <= set(passed)
    assert "FAIL" not in r.stdout
    record("contracts", "re-entering token (ERC-777-style hooks)",
           "payer/payee contract re-enters claim, withdraw, deposit, settleBatch from token send/receive hooks",
           "every re-entry hits the reentrancy guard; each payout made once; token balance == escrow + unclaimed "
           f"({len(passed) - 3} forge tests in Reentrancy.t.sol)")
    record("contracts", "malicious payee",
           "payee contract, from its payout hook and directly: claims again, withdraws / thaws the payer's escrow, "
           "settles a batch crediting itself with the payer's voucher, replays a settled batch; or reverts every payout",
           "only its own credit is paid, once; payer escrow and other payees untouched; a reverting payee blocks "
           "nobody and keeps its credit (3 forge tests)")
