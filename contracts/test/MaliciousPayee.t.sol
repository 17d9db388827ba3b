// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";

import {Test} from "./utils/Test.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {UsageSettlement} from "../src/UsageSettlement.sol";
import {HookToken, ITokenHooks} from "./mocks/HookToken.sol";

/// @dev A payee that, when its payout arrives (token hook), tries every way to move money it does not own:
/// claim again, withdraw or re-direct the payer's escrow, settle a batch crediting itself with the payer's
/// voucher. Or it simply reverts on receipt, to block the others.
contract MaliciousPayee is ITokenHooks {
    UsageSettlement public immutable settlement;
    bytes[] internal attacks;
    bool public refuse;
    uint256 public tried;
    uint256 public succeeded;

    constructor(UsageSettlement s) {
        settlement = s;
    }

    function plan(bytes[] calldata calls) external {
        delete attacks;
        for (uint256 i = 0; i < calls.length; ++i) attacks.push(calls[i]);
    }

    function setRefuse(bool r) external {
        refuse = r;
    }

    function claim() external returns (uint256) {
        return settlement.claim();
    }

    /// The same attacks straight from the payee, outside any callback.
    function attackNow() external {
        _attack();
    }

    function _attack() internal {
        bytes[] memory calls = attacks;
        delete attacks; // once
        for (uint256 i = 0; i < calls.length; ++i) {
            tried++;
            (bool ok,) = address(settlement).call(calls[i]);
            if (ok) succeeded++;
        }
    }

    function tokensToSend(address, address, uint256) external {}

    function tokensReceived(address, address, uint256) external {
        if (refuse) revert("payee refuses payment");
        _attack();
    }
}

contract MaliciousPayeeTest is Test {
    HookToken internal token;
    NodeRegistry internal nodes;
    UsageSettlement internal settlement;
    MaliciousPayee internal evil;
    address internal signer;
    address internal honest;
    uint256 internal payerKey;
    address internal payer;
    uint256 internal nodeId;
    uint256 internal constant DEPOSIT = 10_000;

    function setUp() public {
        signer = makeAddr("signer");
        honest = makeAddr("honest payee");
        (payer, payerKey) = makeAddrAndKey("payer");
        token = new HookToken();
        nodes = new NodeRegistry();
        settlement = new UsageSettlement(IERC20(address(token)), nodes, 1 hours, makeAddr("admin"));
        vm.prank(makeAddr("operator"));
        nodeId = nodes.registerNode(signer, "https://node", "m");
        evil = new MaliciousPayee(settlement);
        vm.prank(address(evil));
        token.registerHooks();
        token.mint(payer, DEPOSIT);
        vm.startPrank(payer);
        token.approve(address(settlement), DEPOSIT);
        settlement.deposit(nodeId, DEPOSIT);
        vm.stopPrank();
    }

    function _voucher(uint256 cumulative) internal view returns (UsageSettlement.SignedVoucher memory sv) {
        sv.voucher = UsageSettlement.Voucher(payer, nodeId, cumulative, uint64(block.timestamp));
        sv.signature = signDigest(payerKey, settlement.hashVoucher(sv.voucher));
    }

    function _args(uint256 toEvil, uint256 toHonest, uint256 cumulative, bytes32 salt)
        internal
        view
        returns (bytes32 batchId, bytes32 root, UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs)
    {
        ds = new UsageSettlement.Debit[](1);
        ds[0].sv = _voucher(cumulative);
        ds[0].amount = toEvil + toHonest;
        cs = new UsageSettlement.Credit[](2);
        cs[0] = UsageSettlement.Credit(address(evil), toEvil);
        cs[1] = UsageSettlement.Credit(honest, toHonest);
        root = keccak256(abi.encode("root", salt));
        batchId = settlement.computeBatchId(nodeId, root);
    }

    function _settle(uint256 toEvil, uint256 toHonest, uint256 cumulative, bytes32 salt) internal returns (bytes32 batchId) {
        (bytes32 id, bytes32 root, UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs) =
            _args(toEvil, toHonest, cumulative, salt);
        vm.prank(signer);
        settlement.settleBatch(nodeId, id, root, 1, ds, cs);
        return id;
    }

    function _solvent() internal view {
        assertEq(
            token.balanceOf(address(settlement)),
            settlement.totalEscrowed() + settlement.totalUnclaimed(),
            "balance == escrow + unclaimed"
        );
    }

    function _attacks(bytes32 settledId) internal view returns (bytes[] memory calls) {
        // a batch crediting the payee 5,000 more, backed by the payer's voucher it saw on chain
        (, bytes32 root2, UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs) =
            _args(5_000, 0, DEPOSIT, "steal");
        (,, UsageSettlement.Debit[] memory ds1, UsageSettlement.Credit[] memory cs1) = _args(1_000, 500, 1_500, "b1");
        calls = new bytes[](7);
        calls[0] = abi.encodeCall(settlement.claim, ());
        calls[1] = abi.encodeCall(settlement.withdraw, (nodeId));
        calls[2] = abi.encodeCall(settlement.requestWithdrawal, (nodeId, DEPOSIT));
        calls[3] = abi.encodeCall(
            settlement.settleBatch, (nodeId, settlement.computeBatchId(nodeId, root2), root2, 1, ds, cs)
        );
        calls[4] = abi.encodeCall(settlement.settleBatch, (nodeId, settledId, keccak256(abi.encode("root", bytes32("b1"))), 1, ds1, cs1));
        calls[5] = abi.encodeCall(settlement.cancelWithdrawal, (nodeId));
        calls[6] = abi.encodeCall(settlement.deposit, (nodeId, 1));
    }

    function test_maliciousPayeeGetsExactlyItsCreditAndNothingElse() public {
        bytes32 id = _settle(1_000, 500, 1_500, "b1");
        evil.plan(_attacks(id));
        assertEq(evil.claim(), 1_000);
        assertEq(evil.tried(), 7);
        assertEq(evil.succeeded(), 0, "no attack from the payout callback went through");
        // and the same attacks outside any callback
        evil.plan(_attacks(id));
        evil.attackNow();
        assertEq(evil.succeeded(), 0, "no direct attack went through");
        assertEq(token.balanceOf(address(evil)), 1_000, "paid its credit once");
        assertEq(settlement.claimable(address(evil)), 0);
        assertEq(settlement.escrowOf(payer, nodeId).balance, DEPOSIT - 1_500, "payer debited only for the batch");
        assertEq(settlement.escrowOf(payer, nodeId).thawing, 0, "no withdrawal started on the payer's escrow");
        assertEq(settlement.collected(payer, nodeId), 1_500);
        vm.prank(honest);
        assertEq(settlement.claim(), 500);
        _solvent();
    }

    function test_payeeThatRefusesPaymentBlocksNobodyAndKeepsItsCredit() public {
        _settle(1_000, 500, 1_500, "b1");
        evil.setRefuse(true);
        vm.expectRevert(bytes("payee refuses payment"));
        evil.claim();
        assertEq(settlement.claimable(address(evil)), 1_000, "a failed claim leaves the credit in place");
        vm.prank(honest);
        assertEq(settlement.claim(), 500, "others still claim");
        // later batches settle although this payee refuses tokens (credits are pull, not push)
        _settle(200, 300, 2_000, "b2");
        assertEq(settlement.claimable(address(evil)), 1_200);
        evil.setRefuse(false);
        assertEq(evil.claim(), 1_200);
        _solvent();
    }

    function test_payeeCannotSettleOrReplayBatches() public {
        bytes32 id = _settle(1_000, 500, 1_500, "b1");
        (bytes32 id2, bytes32 root2, UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs) =
            _args(5_000, 0, DEPOSIT, "steal");
        vm.prank(address(evil));
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.NotNodeSigner.selector, nodeId, address(evil)));
        settlement.settleBatch(nodeId, id2, root2, 1, ds, cs);
        // the node cannot pay it twice for one batch either
        (, bytes32 root1, UsageSettlement.Debit[] memory ds1, UsageSettlement.Credit[] memory cs1) = _args(1_000, 500, 1_500, "b1");
        vm.prank(signer);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.BatchAlreadySettled.selector, nodeId, id));
        settlement.settleBatch(nodeId, id, root1, 1, ds1, cs1);
        // and an old voucher cannot back a new batch past its cumulative value
        (bytes32 id3, bytes32 root3, UsageSettlement.Debit[] memory ds3, UsageSettlement.Credit[] memory cs3) =
            _args(1, 0, 1_500, "b3");
        vm.prank(signer);
        vm.expectRevert(abi.encodeWithSelector(UsageSettlement.VoucherExceeded.selector, payer, 1_500, 1_500, 1));
        settlement.settleBatch(nodeId, id3, root3, 1, ds3, cs3);
        assertEq(settlement.claimable(address(evil)), 1_000);
        _solvent();
    }
}
