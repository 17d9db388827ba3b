// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {InvariantTest} from "../utils/Test.sol";
import {TestToken} from "../../src/TestToken.sol";
import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {UsageSettlement} from "../../src/UsageSettlement.sol";
import {SettlementHandler} from "./SettlementHandler.sol";

/// @dev Invariants of UsageSettlement under random sequences of every action (see SettlementHandler).
contract SettlementInvariantTest is InvariantTest {
    TestToken internal token;
    NodeRegistry internal nodes;
    UsageSettlement internal settlement;
    SettlementHandler internal handler;

    function setUp() public {
        vm.warp(1_700_000_000);
        address admin = vm.addr(0xad);
        address operator = vm.addr(0x0b);
        uint256 signerKey = 0x51;
        token = new TestToken("Test USD", "tUSD", 6);
        nodes = new NodeRegistry();
        settlement = new UsageSettlement(token, nodes, 1 days, admin);
        vm.prank(operator);
        uint256 nodeId = nodes.registerNode(vm.addr(signerKey), "https://node", "m");
        handler = new SettlementHandler(settlement, token, nodes, nodeId, operator, signerKey, admin);

        bytes4[] memory selectors = new bytes4[](15);
        selectors[0] = SettlementHandler.deposit.selector;
        selectors[1] = SettlementHandler.requestWithdrawal.selector;
        selectors[2] = SettlementHandler.cancelWithdrawal.selector;
        selectors[3] = SettlementHandler.withdraw.selector;
        selectors[4] = SettlementHandler.settle.selector;
        selectors[5] = SettlementHandler.settleOnOldVoucher.selector;
        selectors[6] = SettlementHandler.settleOverVoucher.selector;
        selectors[7] = SettlementHandler.settleOverEscrow.selector;
        selectors[8] = SettlementHandler.replayBatch.selector;
        selectors[9] = SettlementHandler.settleAsSomeoneElse.selector;
        selectors[10] = SettlementHandler.rotateSigner.selector;
        selectors[11] = SettlementHandler.claim.selector;
        selectors[12] = SettlementHandler.warp.selector;
        selectors[13] = SettlementHandler.setThawingPeriod.selector;
        selectors[14] = SettlementHandler.deposit.selector; // deposits twice as likely: keeps escrows non-empty
        targetContract(address(handler));
        targetSelector(FuzzSelector({addr: address(handler), selectors: selectors}));
    }

    /// total claimed <= total credited == total debited <= total deposited
    function invariant_moneyFlowsInOrder() public view {
        assertLe(handler.ghostClaimed(), handler.ghostCredited(), "claimed <= credited");
        assertEq(handler.ghostCredited(), handler.ghostDebited(), "credited == debited");
        assertLe(handler.ghostDebited() + handler.ghostWithdrawn(), handler.ghostDeposited(), "debited + withdrawn <= deposited");
    }

    /// Escrows add up (no balance ever went negative or appeared from nowhere).
    function invariant_escrowsAddUp() public view {
        address[3] memory payers = handler.payers();
        uint256 sum;
        for (uint256 i = 0; i < payers.length; ++i) {
            sum += settlement.escrowOf(payers[i], handler.nodeId()).balance;
        }
        assertEq(sum, settlement.totalEscrowed(), "sum of escrows == totalEscrowed");
        assertEq(
            settlement.totalEscrowed(),
            handler.ghostDeposited() - handler.ghostWithdrawn() - handler.ghostDebited(),
            "escrowed == deposited - withdrawn - debited"
        );
    }

    /// Unclaimed credits add up.
    function invariant_creditsAddUp() public view {
        address[4] memory payees = handler.payees();
        uint256 sum;
        for (uint256 i = 0; i < payees.length; ++i) {
            sum += settlement.claimable(payees[i]);
        }
        assertEq(sum, settlement.totalUnclaimed(), "sum of claimable == totalUnclaimed");
        assertEq(settlement.totalUnclaimed(), handler.ghostCredited() - handler.ghostClaimed(), "unclaimed == credited - claimed");
        assertEq(handler.payoutMismatches(), 0, "claims and withdrawals pay what they report");
    }

    /// The token balance always covers every escrow and every unclaimed credit (exactly, here).
    function invariant_solvent() public view {
        uint256 owed = settlement.totalEscrowed() + settlement.totalUnclaimed();
        assertGe(token.balanceOf(address(settlement)), owed, "balance covers escrow + unclaimed");
        assertEq(token.balanceOf(address(settlement)), owed, "no stray tokens");
    }

    /// Collected-so-far never exceeds the payer's highest signed voucher.
    function invariant_collectedWithinVouchers() public view {
        address[3] memory payers = handler.payers();
        for (uint256 i = 0; i < payers.length; ++i) {
            assertLe(
                settlement.collected(payers[i], handler.nodeId()), handler.highestVoucher(payers[i]), "collected <= voucher"
            );
        }
        assertEq(handler.overVoucherSettles(), 0, "no debit beyond a voucher");
        assertEq(handler.overEscrowSettles(), 0, "no debit beyond the escrow");
    }

    /// A batch id settles once; only the node's current signer settles; thawing is respected.
    function invariant_forbiddenOutcomesNeverHappen() public view {
        assertEq(handler.doubleSettles(), 0, "a batch id settles once");
        assertEq(handler.unauthorizedSettles(), 0, "only the current signer settles");
        assertEq(handler.earlyWithdrawals(), 0, "no withdrawal before thawEnd");
        assertEq(handler.honestSettleFailures(), 0, "every honest batch settles");
    }
}
