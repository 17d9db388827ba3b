// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Fixture, BatchTree} from "./utils/Fixture.sol";
import {UsageSettlement} from "../src/UsageSettlement.sol";

/// @dev Fuzz tests on amounts, splits, voucher sequences and batch shapes.
contract UsageSettlementFuzzTest is Fixture {
    uint256 internal constant MAX_AMOUNT = 1e30;

    UsageSettlement.Credit[] internal noCredits;

    function _trySettle(UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs)
        internal
        returns (bool ok, bytes memory err)
    {
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        vm.prank(signer);
        try settlement.settleBatch(nodeId, batchId, root, 1, ds, cs) {
            ok = true;
        } catch (bytes memory e) {
            err = e;
        }
    }

    function testFuzz_depositThenWithdrawAll(uint256 amount, uint256 part, uint64 period) public {
        amount = bound(amount, 1, MAX_AMOUNT);
        part = bound(part, 1, amount);
        period = uint64(bound(period, settlement.MIN_THAWING_PERIOD(), settlement.MAX_THAWING_PERIOD()));
        vm.prank(admin);
        settlement.setThawingPeriod(period);
        fund(payer, amount);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, part);
        vm.warp(block.timestamp + period - 1);
        vm.prank(payer);
        vm.expectRevert();
        settlement.withdraw(nodeId);
        vm.warp(block.timestamp + 1);
        vm.prank(payer);
        assertEq(settlement.withdraw(nodeId), part);
        assertEq(token.balanceOf(payer), part);
        assertEq(settlement.escrowOf(payer, nodeId).balance, amount - part);
        assertEq(settlement.totalEscrowed(), amount - part);
        assertEq(token.balanceOf(address(settlement)), amount - part);
    }

    /// A debit succeeds exactly when it fits both the voucher's remainder and the escrow.
    function testFuzz_debitWithinVoucherAndEscrow(uint256 deposit, uint256 value, uint256 amount) public {
        deposit = bound(deposit, 1, MAX_AMOUNT);
        value = bound(value, 0, MAX_AMOUNT);
        amount = bound(amount, 0, MAX_AMOUNT);
        fund(payer, deposit);
        (bool ok, bytes memory err) = _trySettle(oneDebit(payerKey, value, amount), oneCredit(operator, amount));
        if (amount > value) {
            assertFalse(ok);
            assertEq(err, abi.encodeWithSelector(UsageSettlement.VoucherExceeded.selector, payer, value, 0, amount));
        } else if (amount > deposit) {
            assertFalse(ok);
            assertEq(
                err, abi.encodeWithSelector(UsageSettlement.InsufficientEscrow.selector, payer, nodeId, deposit, amount)
            );
        } else {
            assertTrue(ok);
            assertEq(settlement.collected(payer, nodeId), amount);
            assertEq(settlement.escrowOf(payer, nodeId).balance, deposit - amount);
            assertEq(settlement.claimable(operator), amount);
        }
    }

    /// Any split of a debit into owner / contributors / operator shares pays out to the unit.
    function testFuzz_revenueSplitPaysEveryUnit(uint256 amount, uint16 ownerBps, uint16 contributorsBps) public {
        amount = bound(amount, 0, MAX_AMOUNT);
        ownerBps = uint16(bound(ownerBps, 0, 10_000));
        contributorsBps = uint16(bound(contributorsBps, 0, 10_000 - ownerBps));
        fund(payer, MAX_AMOUNT);
        UsageSettlement.Credit[] memory cs = splitCredits(amount, ownerBps, contributorsBps);
        settle(oneDebit(payerKey, amount, amount), cs);
        uint256 o = settlement.claimable(adapterOwner);
        uint256 c = settlement.claimable(contributor);
        uint256 p = settlement.claimable(operator);
        assertEq(o + c + p, amount);
        assertEq(o, amount * ownerBps / 10_000);
        assertEq(c, amount * contributorsBps / 10_000);
        assertLe(p, amount * (10_000 - ownerBps - contributorsBps) / 10_000 + 2);
        if (o > 0) {
            vm.prank(adapterOwner);
            settlement.claim();
        }
        if (c > 0) {
            vm.prank(contributor);
            settlement.claim();
        }
        if (p > 0) {
            vm.prank(operator);
            settlement.claim();
        }
        assertEq(token.balanceOf(adapterOwner) + token.balanceOf(contributor) + token.balanceOf(operator), amount);
        assertEq(settlement.totalUnclaimed(), 0);
    }

    /// Debits and credits must balance to the unit.
    function testFuzz_unbalancedBatchesRevert(uint256 debited, uint256 credited) public {
        debited = bound(debited, 0, MAX_AMOUNT);
        credited = bound(credited, 0, MAX_AMOUNT);
        vm.assume(debited != credited);
        fund(payer, MAX_AMOUNT);
        (bool ok, bytes memory err) = _trySettle(oneDebit(payerKey, debited, debited), oneCredit(operator, credited));
        assertFalse(ok);
        assertEq(err, abi.encodeWithSelector(UsageSettlement.UnbalancedBatch.selector, debited, credited));
    }

    /// A sequence of cumulative vouchers collects exactly the latest value; every older voucher is spent.
    function testFuzz_cumulativeVoucherSequence(uint64[6] memory increments) public {
        fund(payer, MAX_AMOUNT);
        UsageSettlement.Debit[] memory history = new UsageSettlement.Debit[](increments.length);
        uint256 cumulative;
        for (uint256 i = 0; i < increments.length; ++i) {
            cumulative += increments[i];
            history[i] = debit(payerKey, cumulative, increments[i]);
            UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
            ds[0] = history[i];
            settle(ds, oneCredit(operator, increments[i]));
            assertEq(settlement.collected(payer, nodeId), cumulative);
        }
        for (uint256 i = 0; i < history.length; ++i) {
            UsageSettlement.Debit[] memory replay = new UsageSettlement.Debit[](1);
            replay[0] = history[i];
            replay[0].amount = 1;
            (bool ok,) = _trySettle(replay, oneCredit(operator, 1));
            assertFalse(ok, "a used voucher pays nothing more");
        }
        assertEq(settlement.escrowOf(payer, nodeId).balance, MAX_AMOUNT - cumulative);
    }

    /// Random batch shapes: up to 6 payers each debited part of their voucher, the total split over up to
    /// 8 payees in random parts.
    function testFuzz_batchShapes(uint8 nPayers, uint8 nPayees, uint256 seed) public {
        nPayers = uint8(bound(nPayers, 0, 6));
        nPayees = uint8(bound(nPayees, 1, 8));
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](nPayers);
        uint256[] memory deposits = new uint256[](nPayers);
        uint256 total;
        for (uint256 i = 0; i < nPayers; ++i) {
            uint256 key = uint256(keccak256(abi.encode("payer-key", i))) % 1e70 + 1;
            address who = vm.addr(key);
            deposits[i] = uint256(keccak256(abi.encode(seed, "deposit", i))) % 1e24 + 1;
            fund(who, deposits[i]);
            uint256 amount = uint256(keccak256(abi.encode(seed, "amount", i))) % (deposits[i] + 1);
            uint256 value = amount + uint256(keccak256(abi.encode(seed, "slack", i))) % 1e18;
            ds[i] = debit(key, value, amount);
            total += amount;
        }
        UsageSettlement.Credit[] memory cs = new UsageSettlement.Credit[](nPayees);
        uint256 left = total;
        for (uint256 j = 0; j < nPayees; ++j) {
            uint256 part = j + 1 == nPayees ? left : uint256(keccak256(abi.encode(seed, "credit", j))) % (left + 1);
            cs[j] = UsageSettlement.Credit({payee: vm.addr(1000 + j), amount: part});
            left -= part;
        }
        settle(ds, cs);
        for (uint256 i = 0; i < nPayers; ++i) {
            address who = ds[i].sv.voucher.payer;
            assertEq(settlement.escrowOf(who, nodeId).balance, deposits[i] - ds[i].amount);
            assertEq(settlement.collected(who, nodeId), ds[i].amount);
        }
        uint256 sum;
        for (uint256 j = 0; j < nPayees; ++j) {
            sum += settlement.claimable(vm.addr(1000 + j));
        }
        assertEq(sum, total);
        assertEq(settlement.totalUnclaimed(), total);
        assertEq(token.balanceOf(address(settlement)), settlement.totalEscrowed() + settlement.totalUnclaimed());
    }

    /// Every receipt of a batch of any size verifies with its proof, and only with its own.
    function testFuzz_merkleBatchesOfAnySize(uint8 n, uint256 salt) public {
        n = uint8(bound(n, 1, 40));
        UsageSettlement.Receipt[] memory rs = new UsageSettlement.Receipt[](n);
        bytes32[] memory leaves = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            rs[i] = receipt(i, payer);
            rs[i].requestId = keccak256(abi.encode(salt, i));
            leaves[i] = settlement.receiptLeaf(receiptDigest(rs[i]));
        }
        bytes32 root = BatchTree.root(leaves);
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        UsageSettlement.Debit[] memory none;
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, uint32(n), none, noCredits);
        uint256 pick = salt % n;
        for (uint256 i = 0; i < n; ++i) {
            bytes memory sig = signDigest(signerKey, receiptDigest(rs[i]));
            assertTrue(settlement.verifyReceipt(nodeId, batchId, rs[i], sig, BatchTree.proof(leaves, leaves[i])));
            if (n > 1 && i != pick) {
                assertFalse(
                    settlement.verifyReceipt(nodeId, batchId, rs[i], sig, BatchTree.proof(leaves, leaves[pick]))
                );
            }
        }
    }

    /// Withdrawals never pay before thawEnd, whatever the timing.
    function testFuzz_thawingIsRespected(uint256 amount, uint256 wait) public {
        amount = bound(amount, 1, MAX_AMOUNT);
        wait = bound(wait, 0, 2 * THAW);
        fund(payer, amount);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, amount);
        uint256 end = block.timestamp + THAW;
        vm.warp(block.timestamp + wait);
        vm.prank(payer);
        try settlement.withdraw(nodeId) returns (uint256 got) {
            assertGe(block.timestamp, end);
            assertEq(got, amount);
        } catch {
            assertLt(block.timestamp, end);
        }
    }
}
