// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

import {Fixture, BatchTree} from "./utils/Fixture.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {UsageSettlement} from "../src/UsageSettlement.sol";
import {FeeOnTransferToken} from "./mocks/FeeOnTransferToken.sol";
import {ERC1271Wallet} from "./mocks/ERC1271Wallet.sol";

contract UsageSettlementTest is Fixture {
    UsageSettlement.Debit[] internal noDebits;
    UsageSettlement.Credit[] internal noCredits;

    // ================================================================ constructor and owner

    function test_constructor_setsEverything() public view {
        assertEq(address(settlement.token()), address(token));
        assertEq(address(settlement.nodes()), address(nodes));
        assertEq(settlement.thawingPeriod(), THAW);
        assertEq(settlement.owner(), admin);
        assertEq(settlement.DOMAIN_SEPARATOR(), domainSeparatorByHand());
        (, string memory name, string memory version, uint256 chainId, address verifying,,) = settlement.eip712Domain();
        assertEq(name, "OpenLoRA");
        assertEq(version, "1");
        assertEq(chainId, block.chainid);
        assertEq(verifying, address(settlement));
    }

    function test_constructor_emitsThawingPeriod() public {
        vm.expectEmit();
        emit UsageSettlement.ThawingPeriodSet(0, 3600);
        new UsageSettlement(token, nodes, 3600, admin);
    }

    function test_constructor_reverts() public {
        vm.expectRevert(UsageSettlement.ZeroAddress.selector);
        new UsageSettlement(IERC20(address(0)), nodes, THAW, admin);
        vm.expectRevert(UsageSettlement.ZeroAddress.selector);
        new UsageSettlement(token, NodeRegistry(address(0)), THAW, admin);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.ThawingPeriodOutOfBounds.selector, 59));
        new UsageSettlement(token, nodes, 59, admin);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.ThawingPeriodOutOfBounds.selector, 30 days + 1));
        new UsageSettlement(token, nodes, 30 days + 1, admin);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableInvalidOwner.selector, address(0)));
        new UsageSettlement(token, nodes, THAW, address(0));
    }

    function test_setThawingPeriod() public {
        vm.expectEmit(address(settlement));
        emit UsageSettlement.ThawingPeriodSet(THAW, 2 hours);
        vm.prank(admin);
        settlement.setThawingPeriod(2 hours);
        assertEq(settlement.thawingPeriod(), 2 hours);
        vm.startPrank(admin);
        settlement.setThawingPeriod(60); // both bounds are inclusive
        settlement.setThawingPeriod(30 days);
        vm.stopPrank();
    }

    function test_setThawingPeriod_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        vm.prank(stranger);
        settlement.setThawingPeriod(2 hours);
        vm.startPrank(admin);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.ThawingPeriodOutOfBounds.selector, 0));
        settlement.setThawingPeriod(0);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.ThawingPeriodOutOfBounds.selector, 31 days));
        settlement.setThawingPeriod(31 days);
        vm.stopPrank();
    }

    // ================================================================ deposit

    function test_deposit_escrowsAndEmits() public {
        token.mint(payer, 1_000);
        vm.startPrank(payer);
        token.approve(address(settlement), 1_000);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Deposited(payer, nodeId, 600, 600);
        settlement.deposit(nodeId, 600);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Deposited(payer, nodeId, 400, 1_000);
        settlement.deposit(nodeId, 400);
        vm.stopPrank();
        assertEq(settlement.escrowOf(payer, nodeId).balance, 1_000);
        assertEq(settlement.totalEscrowed(), 1_000);
        assertEq(token.balanceOf(address(settlement)), 1_000);
        assertEq(token.balanceOf(payer), 0);
    }

    function test_deposit_reverts() public {
        token.mint(payer, 1_000);
        vm.startPrank(payer);
        vm.expectRevert(UsageSettlement.ZeroAmount.selector);
        settlement.deposit(nodeId, 0);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.UnknownNode.selector, 99));
        settlement.deposit(99, 1);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, address(settlement), 0, 1)
        );
        settlement.deposit(nodeId, 1);
        token.approve(address(settlement), 5_000);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientBalance.selector, payer, 1_000, 5_000)
        );
        settlement.deposit(nodeId, 5_000);
        vm.stopPrank();
        vm.prank(operator);
        nodes.deactivateNode(nodeId);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NodeInactive.selector, nodeId));
        vm.prank(payer);
        settlement.deposit(nodeId, 1);
    }

    function test_deposit_creditsWhatArrivesOfAFeeOnTransferToken() public {
        FeeOnTransferToken fee = new FeeOnTransferToken();
        UsageSettlement s = new UsageSettlement(IERC20(address(fee)), nodes, THAW, admin);
        fee.mint(payer, 1_000);
        vm.startPrank(payer);
        fee.approve(address(s), 1_000);
        s.deposit(nodeId, 1_000);
        vm.stopPrank();
        assertEq(s.escrowOf(payer, nodeId).balance, 990);
        assertEq(s.totalEscrowed(), 990);
        assertEq(fee.balanceOf(address(s)), 990);
    }

    // ================================================================ withdrawal

    function test_requestWithdrawal_startsThawing() public {
        fund(payer, 1_000);
        uint64 end = uint64(block.timestamp) + THAW;
        vm.expectEmit(address(settlement));
        emit UsageSettlement.WithdrawalRequested(payer, nodeId, 400, end);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 400);
        UsageSettlement.Escrow memory e = settlement.escrowOf(payer, nodeId);
        assertEq(e.balance, 1_000);
        assertEq(e.thawing, 400);
        assertEq(e.thawEnd, end);
    }

    function test_requestWithdrawal_replacesAndRestartsTheClock() public {
        fund(payer, 1_000);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 400);
        vm.warp(block.timestamp + THAW - 1);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 700);
        UsageSettlement.Escrow memory e = settlement.escrowOf(payer, nodeId);
        assertEq(e.thawing, 700);
        assertEq(e.thawEnd, block.timestamp + THAW);
    }

    function test_requestWithdrawal_reverts() public {
        fund(payer, 1_000);
        vm.startPrank(payer);
        vm.expectRevert(UsageSettlement.ZeroAmount.selector);
        settlement.requestWithdrawal(nodeId, 0);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.InsufficientEscrow.selector, payer, nodeId, 1_000, 1_001));
        settlement.requestWithdrawal(nodeId, 1_001);
        vm.stopPrank();
    }

    function test_cancelWithdrawal() public {
        fund(payer, 1_000);
        vm.startPrank(payer);
        settlement.requestWithdrawal(nodeId, 400);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.WithdrawalCancelled(payer, nodeId);
        settlement.cancelWithdrawal(nodeId);
        UsageSettlement.Escrow memory e = settlement.escrowOf(payer, nodeId);
        assertEq(e.thawing, 0);
        assertEq(e.thawEnd, 0);
        vm.warp(block.timestamp + THAW);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NoWithdrawalRequested.selector, payer, nodeId));
        settlement.withdraw(nodeId);
        vm.stopPrank();
    }

    function test_cancelWithdrawal_revertsWithoutRequest() public {
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NoWithdrawalRequested.selector, payer, nodeId));
        vm.prank(payer);
        settlement.cancelWithdrawal(nodeId);
    }

    function test_withdraw_paysAfterThawing() public {
        fund(payer, 1_000);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 400);
        uint64 end = uint64(block.timestamp) + THAW;
        vm.warp(end - 1);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.StillThawing.selector, end, end - 1));
        vm.prank(payer);
        settlement.withdraw(nodeId);
        vm.warp(end); // thawed exactly at thawEnd
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Withdrawn(payer, nodeId, 400);
        vm.prank(payer);
        assertEq(settlement.withdraw(nodeId), 400);
        assertEq(token.balanceOf(payer), 400);
        UsageSettlement.Escrow memory e = settlement.escrowOf(payer, nodeId);
        assertEq(e.balance, 600);
        assertEq(e.thawing, 0);
        assertEq(e.thawEnd, 0);
        assertEq(settlement.totalEscrowed(), 600);
    }

    function test_withdraw_revertsWithoutRequest() public {
        fund(payer, 1_000);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NoWithdrawalRequested.selector, payer, nodeId));
        vm.prank(payer);
        settlement.withdraw(nodeId);
    }

    function test_withdraw_isCappedByWhatSettlementLeft() public {
        fund(payer, 1_000);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 1_000);
        // the node settles 700 during the thawing period
        settle(oneDebit(payerKey, 700, 700), oneCredit(operator, 700));
        vm.warp(block.timestamp + THAW);
        vm.prank(payer);
        assertEq(settlement.withdraw(nodeId), 300);
        assertEq(token.balanceOf(payer), 300);
        assertEq(settlement.escrowOf(payer, nodeId).balance, 0);
    }

    function test_withdraw_ofNothingLeftPaysZero() public {
        fund(payer, 500);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 500);
        settle(oneDebit(payerKey, 500, 500), oneCredit(operator, 500));
        vm.warp(block.timestamp + THAW);
        vm.prank(payer);
        assertEq(settlement.withdraw(nodeId), 0);
        assertEq(settlement.escrowOf(payer, nodeId).thawEnd, 0);
    }

    function test_withdraw_keepsThawEndWhenPeriodChanges() public {
        fund(payer, 1_000);
        vm.prank(payer);
        settlement.requestWithdrawal(nodeId, 100);
        uint64 end = uint64(block.timestamp) + THAW;
        vm.prank(admin);
        settlement.setThawingPeriod(30 days);
        vm.warp(end);
        vm.prank(payer);
        assertEq(settlement.withdraw(nodeId), 100);
    }

    // ================================================================ settleBatch

    function test_settleBatch_debitsCreditsAndRecords() public {
        fund(payer, 10_000);
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        UsageSettlement.Credit[] memory cs = splitCredits(1_000, 6_000, 3_000);

        vm.expectEmit(address(settlement));
        emit UsageSettlement.Debited(nodeId, batchId, payer, 1_000, 1_000);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Credited(nodeId, batchId, adapterOwner, 600);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Credited(nodeId, batchId, contributor, 300);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Credited(nodeId, batchId, operator, 100);
        vm.expectEmit(address(settlement));
        emit UsageSettlement.BatchSettled(nodeId, batchId, signer, root, 7, 1_000);
        UsageSettlement.Debit[] memory ds = oneDebit(payerKey, 1_500, 1_000);
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, 7, ds, cs);

        assertEq(settlement.escrowOf(payer, nodeId).balance, 9_000);
        assertEq(settlement.collected(payer, nodeId), 1_000);
        assertEq(settlement.claimable(adapterOwner), 600);
        assertEq(settlement.claimable(contributor), 300);
        assertEq(settlement.claimable(operator), 100);
        assertEq(settlement.totalEscrowed(), 9_000);
        assertEq(settlement.totalUnclaimed(), 1_000);
        assertTrue(settlement.isSettled(nodeId, batchId));
        UsageSettlement.Batch memory b = settlement.getBatch(nodeId, batchId);
        assertEq(b.root, root);
        assertEq(b.signer, signer);
        assertEq(b.receiptCount, 7);
        assertEq(b.settledAt, block.timestamp);
    }

    function test_settleBatch_laterVoucherPaysOnlyTheDifference() public {
        fund(payer, 10_000);
        settle(oneDebit(payerKey, 1_000, 1_000), oneCredit(operator, 1_000));
        // cumulative 2_500 after 1_000 collected: at most 1_500 more
        expectSettleRevert(
            abi.encodeWithSelector(UsageSettlement.VoucherExceeded.selector, payer, 2_500, 1_000, 1_501),
            oneDebit(payerKey, 2_500, 1_501),
            oneCredit(operator, 1_501)
        );
        settle(oneDebit(payerKey, 2_500, 1_500), oneCredit(operator, 1_500));
        assertEq(settlement.collected(payer, nodeId), 2_500);
        assertEq(settlement.escrowOf(payer, nodeId).balance, 7_500);
    }

    function test_settleBatch_replayedVoucherPaysNothing() public {
        fund(payer, 10_000);
        UsageSettlement.Debit[] memory ds = oneDebit(payerKey, 1_000, 1_000);
        settle(ds, oneCredit(operator, 1_000));
        // the same voucher in a new batch: nothing left on it
        ds[0].amount = 1;
        expectSettleRevert(
            abi.encodeWithSelector(UsageSettlement.VoucherExceeded.selector, payer, 1_000, 1_000, 1),
            ds,
            oneCredit(operator, 1)
        );
        // an older, smaller voucher neither
        expectSettleRevert(
            abi.encodeWithSelector(UsageSettlement.VoucherExceeded.selector, payer, 400, 1_000, 0),
            oneDebit(payerKey, 400, 0),
            noCredits
        );
        // a zero debit on the spent voucher is harmless
        ds[0].amount = 0;
        settle(ds, noCredits);
        assertEq(settlement.collected(payer, nodeId), 1_000);
    }

    function test_settleBatch_twoDebitsOfOnePayerShareTheVoucher() public {
        fund(payer, 10_000);
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](2);
        ds[0] = debit(payerKey, 1_000, 600);
        ds[1] = debit(payerKey, 1_000, 401);
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.VoucherExceeded.selector, payer, 1_000, 600, 401), ds, oneCredit(operator, 1_001));
        ds[1].amount = 400;
        settle(ds, oneCredit(operator, 1_000));
        assertEq(settlement.collected(payer, nodeId), 1_000);
    }

    function test_settleBatch_manyPayersAndPayees() public {
        (address p2, uint256 k2) = makeAddrAndKey("payer2");
        fund(payer, 1_000);
        fund(p2, 2_000);
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](2);
        ds[0] = debit(payerKey, 700, 700);
        ds[1] = debit(k2, 2_000, 1_300);
        settle(ds, splitCredits(2_000, 5_000, 2_500));
        assertEq(settlement.escrowOf(payer, nodeId).balance, 300);
        assertEq(settlement.escrowOf(p2, nodeId).balance, 700);
        assertEq(settlement.claimable(adapterOwner), 1_000);
        assertEq(settlement.claimable(contributor), 500);
        assertEq(settlement.claimable(operator), 500);
    }

    function test_settleBatch_emptyDebitsAndCredits() public {
        // a batch of free requests records its root and pays nothing
        (bytes32 batchId,) = settle(noDebits, noCredits);
        assertTrue(settlement.isSettled(nodeId, batchId));
    }

    function test_settleBatch_acceptsAContractPayer() public {
        (address walletOwner, uint256 walletKey) = makeAddrAndKey("walletOwner");
        ERC1271Wallet wallet = new ERC1271Wallet(walletOwner);
        token.mint(address(wallet), 1_000);
        vm.startPrank(walletOwner);
        wallet.exec(address(token), abi.encodeCall(token.approve, (address(settlement), 1_000)));
        wallet.exec(address(settlement), abi.encodeCall(settlement.deposit, (nodeId, 1_000)));
        vm.stopPrank();
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
        ds[0].sv.voucher = UsageSettlement.Voucher(address(wallet), nodeId, 800, uint64(block.timestamp));
        ds[0].sv.signature = signDigest(walletKey, this.hashVoucherExt(ds[0].sv.voucher));
        ds[0].amount = 800;
        settle(ds, oneCredit(operator, 800));
        assertEq(settlement.collected(address(wallet), nodeId), 800);
        // a signature by anyone else is refused by the wallet
        ds[0].sv.voucher.cumulativeValue = 900;
        ds[0].sv.signature = signDigest(payerKey, this.hashVoucherExt(ds[0].sv.voucher));
        ds[0].amount = 100;
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.InvalidVoucherSignature.selector, address(wallet)), ds, oneCredit(operator, 100));
    }

    function test_settleBatch_revertsForUnknownNode() public {
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(77, root);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.UnknownNode.selector, 77));
        vm.prank(signer);
        settlement.settleBatch(77, batchId, root, 1, noDebits, noCredits);
    }

    function test_settleBatch_revertsForAnyoneButTheSigner() public {
        fund(payer, 1_000);
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        UsageSettlement.Debit[] memory ds = oneDebit(payerKey, 100, 100);
        UsageSettlement.Credit[] memory cs = oneCredit(operator, 100);
        address[3] memory others = [operator, payer, stranger];
        for (uint256 i = 0; i < others.length; ++i) {
            vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NotNodeSigner.selector, nodeId, others[i]));
            vm.prank(others[i]);
            settlement.settleBatch(nodeId, batchId, root, 1, ds, cs);
        }
    }

    function test_settleBatch_followsSignerRotation() public {
        fund(payer, 1_000);
        (address signer2,) = makeAddrAndKey("signer2");
        vm.prank(operator);
        nodes.rotateSigner(nodeId, signer2);
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        UsageSettlement.Debit[] memory ds = oneDebit(payerKey, 100, 100);
        UsageSettlement.Credit[] memory cs = oneCredit(operator, 100);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NotNodeSigner.selector, nodeId, signer));
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, 1, ds, cs);
        vm.prank(signer2);
        settlement.settleBatch(nodeId, batchId, root, 1, ds, cs);
        assertEq(settlement.getBatch(nodeId, batchId).signer, signer2);
    }

    function test_settleBatch_revertsForInactiveNode() public {
        vm.prank(operator);
        nodes.deactivateNode(nodeId);
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.NodeInactive.selector, nodeId), noDebits, noCredits);
    }

    function test_settleBatch_revertsOnEmptyBatch() public {
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        bytes32 zeroRootId = settlement.computeBatchId(nodeId, 0);
        vm.startPrank(signer);
        vm.expectRevert(UsageSettlement.EmptyBatch.selector);
        settlement.settleBatch(nodeId, batchId, root, 0, noDebits, noCredits);
        vm.expectRevert(UsageSettlement.EmptyBatch.selector);
        settlement.settleBatch(nodeId, zeroRootId, 0, 1, noDebits, noCredits);
        vm.stopPrank();
    }

    function test_settleBatch_revertsOnBadBatchId() public {
        bytes32 root = freshRoot();
        bytes32 expected = settlement.computeBatchId(nodeId, root);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.BadBatchId.selector, expected, bytes32("x")));
        vm.prank(signer);
        settlement.settleBatch(nodeId, bytes32("x"), root, 1, noDebits, noCredits);
    }

    function test_settleBatch_settlesABatchOnce() public {
        fund(payer, 1_000);
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        UsageSettlement.Debit[] memory first = oneDebit(payerKey, 100, 100);
        UsageSettlement.Debit[] memory again = oneDebit(payerKey, 200, 100);
        UsageSettlement.Credit[] memory cs = oneCredit(operator, 100);
        vm.startPrank(signer);
        settlement.settleBatch(nodeId, batchId, root, 1, first, cs);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.BatchAlreadySettled.selector, nodeId, batchId));
        settlement.settleBatch(nodeId, batchId, root, 1, again, cs);
        vm.stopPrank();
    }

    function test_settleBatch_revertsOnVoucherForAnotherNode() public {
        vm.prank(operator);
        uint256 other = nodes.registerNode(signer, "https://other", BASE);
        fund(payer, 1_000);
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
        ds[0].sv = voucher(payerKey, other, 100);
        ds[0].amount = 100;
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.VoucherNodeMismatch.selector, nodeId, other), ds, oneCredit(operator, 100));
    }

    function test_settleBatch_revertsOnBadVoucherSignature() public {
        fund(payer, 1_000);
        (, uint256 otherKey) = makeAddrAndKey("mallory");
        UsageSettlement.Debit[] memory ds = oneDebit(payerKey, 100, 100);
        // signed by someone else
        ds[0].sv.signature = signDigest(otherKey, this.hashVoucherExt(ds[0].sv.voucher));
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.InvalidVoucherSignature.selector, payer), ds, oneCredit(operator, 100));
        // a value raised after signing
        ds = oneDebit(payerKey, 100, 100);
        ds[0].sv.voucher.cumulativeValue = 1_000;
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.InvalidVoucherSignature.selector, payer), ds, oneCredit(operator, 100));
        // garbage
        ds = oneDebit(payerKey, 100, 100);
        ds[0].sv.signature = hex"1234";
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.InvalidVoucherSignature.selector, payer), ds, oneCredit(operator, 100));
    }

    function test_settleBatch_revertsOnInsufficientEscrow() public {
        fund(payer, 100);
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.InsufficientEscrow.selector, payer, nodeId, 100, 101), oneDebit(payerKey, 1_000, 101), oneCredit(operator, 101));
    }

    function test_settleBatch_revertsWhenUnbalanced() public {
        fund(payer, 1_000);
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.UnbalancedBatch.selector, 100, 99), oneDebit(payerKey, 100, 100), oneCredit(operator, 99));
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.UnbalancedBatch.selector, 100, 101), oneDebit(payerKey, 100, 100), oneCredit(operator, 101));
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.UnbalancedBatch.selector, 0, 5), noDebits, oneCredit(operator, 5));
    }

    function test_settleBatch_revertsOnZeroPayee() public {
        fund(payer, 1_000);
        expectSettleRevert(abi.encodeWithSelector(UsageSettlement.ZeroAddress.selector), oneDebit(payerKey, 100, 100), oneCredit(address(0), 100));
    }

    /// @dev Prepares everything first, so the expected revert is the settleBatch call's.
    function expectSettleRevert(bytes memory err, UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs)
        internal
    {
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        vm.expectRevert(err);
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, 1, ds, cs);
    }

    // ================================================================ claim

    function test_claim_paysAndEmits() public {
        fund(payer, 2_000);
        settle(oneDebit(payerKey, 1_000, 1_000), splitCredits(1_000, 6_000, 3_000));
        vm.expectEmit(address(settlement));
        emit UsageSettlement.Claimed(adapterOwner, 600);
        vm.prank(adapterOwner);
        assertEq(settlement.claim(), 600);
        assertEq(token.balanceOf(adapterOwner), 600);
        assertEq(settlement.claimable(adapterOwner), 0);
        assertEq(settlement.totalUnclaimed(), 400);
        // credits accumulate over batches until claimed
        settle(oneDebit(payerKey, 2_000, 1_000), splitCredits(1_000, 6_000, 3_000));
        assertEq(settlement.claimable(contributor), 600);
        vm.prank(contributor);
        assertEq(settlement.claim(), 600);
    }

    function test_claim_revertsWithNothingToClaim() public {
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NothingToClaim.selector, stranger));
        vm.prank(stranger);
        settlement.claim();
        fund(payer, 100);
        settle(oneDebit(payerKey, 100, 100), oneCredit(operator, 100));
        vm.startPrank(operator);
        settlement.claim();
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NothingToClaim.selector, operator));
        settlement.claim();
        vm.stopPrank();
    }

    // ================================================================ receipts

    function _batchOf(uint256 n)
        internal
        returns (UsageSettlement.Receipt[] memory rs, bytes[] memory sigs, bytes32[] memory leaves, bytes32 batchId)
    {
        rs = new UsageSettlement.Receipt[](n);
        sigs = new bytes[](n);
        leaves = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            rs[i] = receipt(i, payer);
            bytes32 digest = receiptDigest(rs[i]);
            sigs[i] = signDigest(signerKey, digest);
            leaves[i] = settlement.receiptLeaf(digest);
        }
        bytes32 root = BatchTree.root(leaves);
        batchId = settlement.computeBatchId(nodeId, root);
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, uint32(n), noDebits, noCredits);
    }

    function _verify(bytes32 batchId, UsageSettlement.Receipt memory r, bytes memory sig, bytes32[] memory proof)
        internal
        view
        returns (bool)
    {
        return settlement.verifyReceipt(nodeId, batchId, r, sig, proof);
    }

    function test_hashReceipt_matchesTheDocEncoding() public view {
        UsageSettlement.Receipt memory r = receipt(3, payer);
        assertEq(receiptDigest(r), receiptDigestByHand(r));
    }

    function test_hashVoucher_matchesTheDocEncoding() public view {
        UsageSettlement.Voucher memory v = UsageSettlement.Voucher(payer, nodeId, 12345, 678);
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256("Voucher(address payer,uint256 nodeId,uint256 cumulativeValue,uint64 timestamp)"),
                payer,
                nodeId,
                uint256(12345),
                uint64(678)
            )
        );
        assertEq(settlement.VOUCHER_TYPEHASH(), keccak256("Voucher(address payer,uint256 nodeId,uint256 cumulativeValue,uint64 timestamp)"));
        assertEq(this.hashVoucherExt(v), keccak256(abi.encodePacked("\x19\x01", domainSeparatorByHand(), structHash)));
    }

    function test_receiptLeafAndBatchId() public view {
        bytes32 d = keccak256("digest");
        assertEq(settlement.receiptLeaf(d), keccak256(abi.encodePacked(keccak256(abi.encodePacked(d)))));
        assertEq(settlement.computeBatchId(5, d), keccak256(abi.encode(uint256(5), d)));
    }

    function test_verifyReceipt_everyLeafOfABatch() public {
        for (uint256 n = 1; n <= 7; ++n) {
            (UsageSettlement.Receipt[] memory rs, bytes[] memory sigs, bytes32[] memory leaves, bytes32 batchId) =
                _batchOf(n);
            for (uint256 i = 0; i < n; ++i) {
                assertTrue(_verify(batchId, rs[i], sigs[i], BatchTree.proof(leaves, leaves[i])), "leaf verifies");
            }
            vm.warp(block.timestamp + 1); // next batch gets other receipts (timestamps differ)
        }
    }

    function test_verifyReceipt_falseCases() public {
        (UsageSettlement.Receipt[] memory rs, bytes[] memory sigs, bytes32[] memory leaves, bytes32 batchId) =
            _batchOf(4);
        bytes32[] memory proof = BatchTree.proof(leaves, leaves[1]);
        UsageSettlement.Receipt memory r = rs[1];
        assertTrue(_verify(batchId, r, sigs[1], proof));
        // an unsettled batch
        assertFalse(_verify(bytes32("nope"), r, sigs[1], proof));
        // another node id in the query
        assertFalse(settlement.verifyReceipt(nodeId + 1, batchId, r, sigs[1], proof));
        // another receipt's signature
        assertFalse(_verify(batchId, r, sigs[2], proof));
        // a signature by someone else than the batch signer
        assertFalse(_verify(batchId, r, signDigest(payerKey, receiptDigest(r)), proof));
        // malformed signature
        assertFalse(_verify(batchId, r, hex"00", proof));
        // another leaf's proof
        assertFalse(_verify(batchId, r, sigs[1], BatchTree.proof(leaves, leaves[0])));
        // a tampered field (signature no longer matches)
        r.cost += 1;
        assertFalse(_verify(batchId, r, sigs[1], proof));
        // a receipt signed correctly but not in the batch
        UsageSettlement.Receipt memory outside = receipt(99, payer);
        assertFalse(_verify(batchId, outside, signDigest(signerKey, receiptDigest(outside)), proof));
        // a receipt whose own nodeId differs from the batch's node
        UsageSettlement.Receipt memory alien = receipt(1, payer);
        alien.nodeId = nodeId + 1;
        assertFalse(_verify(batchId, alien, signDigest(signerKey, receiptDigest(alien)), proof));
    }

    function test_verifyReceipt_usesTheSignerRecordedForTheBatch() public {
        (UsageSettlement.Receipt[] memory rs, bytes[] memory sigs, bytes32[] memory leaves, bytes32 batchId) =
            _batchOf(3);
        (address signer2,) = makeAddrAndKey("signer2");
        vm.prank(operator);
        nodes.rotateSigner(nodeId, signer2);
        assertTrue(_verify(batchId, rs[0], sigs[0], BatchTree.proof(leaves, leaves[0])));
    }
}
