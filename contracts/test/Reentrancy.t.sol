// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

import {Test} from "./utils/Test.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {UsageSettlement} from "../src/UsageSettlement.sol";
import {HookToken, ITokenHooks} from "./mocks/HookToken.sol";

/// @dev A payer / payee contract that, from the token's hooks, calls back into the settlement contract.
contract Attacker is ITokenHooks {
    UsageSettlement public immutable settlement;
    IERC20 public immutable token;
    uint256 public immutable nodeId;

    bytes public reentryCall; // calldata to re-enter with
    bool public bubble; // let the re-entry's revert abort the outer call
    uint256 public attempts;
    bytes public lastRevert;
    bool public reentrySucceeded;

    constructor(UsageSettlement s, uint256 node) {
        settlement = s;
        token = s.token();
        nodeId = node;
    }

    function arm(bytes calldata data, bool bubble_) external {
        reentryCall = data;
        bubble = bubble_;
    }

    function approveAndDeposit(uint256 amount) external {
        token.approve(address(settlement), amount);
        settlement.deposit(nodeId, amount);
    }

    function requestWithdrawal(uint256 amount) external {
        settlement.requestWithdrawal(nodeId, amount);
    }

    function withdraw() external returns (uint256) {
        return settlement.withdraw(nodeId);
    }

    function claim() external returns (uint256) {
        return settlement.claim();
    }

    function _reenter() internal {
        if (reentryCall.length == 0 || attempts > 0) return;
        attempts++;
        (bool ok, bytes memory ret) = address(settlement).call(reentryCall);
        reentrySucceeded = ok;
        lastRevert = ret;
        if (!ok && bubble) {
            assembly {
                revert(add(ret, 32), mload(ret))
            }
        }
    }

    function tokensToSend(address, address, uint256) external {
        _reenter();
    }

    function tokensReceived(address, address, uint256) external {
        _reenter();
    }
}

contract ReentrancyTest is Test {
    HookToken internal token;
    NodeRegistry internal nodes;
    UsageSettlement internal settlement;
    Attacker internal attacker;
    address internal operator;
    address internal signer;
    uint256 internal payerKey;
    address internal payer;
    uint256 internal nodeId;

    bytes internal GUARD = abi.encodeWithSelector(ReentrancyGuard.ReentrancyGuardReentrantCall.selector);

    function setUp() public {
        operator = makeAddr("operator");
        signer = makeAddr("signer");
        (payer, payerKey) = makeAddrAndKey("payer");
        token = new HookToken();
        nodes = new NodeRegistry();
        settlement = new UsageSettlement(IERC20(address(token)), nodes, 1 hours, makeAddr("admin"));
        vm.prank(operator);
        nodeId = nodes.registerNode(signer, "https://node", "m");
        attacker = new Attacker(settlement, nodeId);
        vm.prank(address(attacker));
        token.registerHooks();
    }

    function _solvent() internal view {
        assertEq(
            token.balanceOf(address(settlement)),
            settlement.totalEscrowed() + settlement.totalUnclaimed(),
            "balance == escrow + unclaimed"
        );
    }

    /// Credits `amount` to the attacker through a settled batch paid by `payer`.
    function _creditAttacker(uint256 amount) internal {
        token.mint(payer, amount);
        vm.startPrank(payer);
        token.approve(address(settlement), amount);
        settlement.deposit(nodeId, amount);
        vm.stopPrank();
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
        ds[0].sv.voucher = UsageSettlement.Voucher(payer, nodeId, amount, uint64(block.timestamp));
        ds[0].sv.signature = signDigest(payerKey, settlement.hashVoucher(ds[0].sv.voucher));
        ds[0].amount = amount;
        UsageSettlement.Credit[] memory cs = new UsageSettlement.Credit[](1);
        cs[0] = UsageSettlement.Credit(address(attacker), amount);
        bytes32 root = keccak256(abi.encode("root", amount, block.timestamp));
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, 1, ds, cs);
    }

    function test_claimCannotBeReentered() public {
        _creditAttacker(1_000);
        attacker.arm(abi.encodeCall(settlement.claim, ()), false);
        assertEq(attacker.claim(), 1_000);
        assertEq(attacker.attempts(), 1);
        assertFalse(attacker.reentrySucceeded());
        assertEq(attacker.lastRevert(), GUARD);
        assertEq(token.balanceOf(address(attacker)), 1_000, "paid once");
        assertEq(settlement.claimable(address(attacker)), 0);
        _solvent();
    }

    function test_claimCannotReenterWithdraw() public {
        // cross-function: the attacker is both payer (with a thawed withdrawal) and payee
        token.mint(address(attacker), 500);
        attacker.approveAndDeposit(500);
        attacker.requestWithdrawal(500);
        vm.warp(block.timestamp + 1 hours);
        _creditAttacker(1_000);
        attacker.arm(abi.encodeCall(settlement.withdraw, (nodeId)), false);
        attacker.claim();
        assertEq(attacker.lastRevert(), GUARD);
        assertEq(settlement.escrowOf(address(attacker), nodeId).balance, 500, "withdrawal did not run inside claim");
        attacker.arm("", false);
        assertEq(attacker.withdraw(), 500);
        assertEq(token.balanceOf(address(attacker)), 1_500);
        _solvent();
    }

    function test_withdrawCannotBeReentered() public {
        token.mint(address(attacker), 800);
        attacker.approveAndDeposit(800);
        attacker.requestWithdrawal(300);
        vm.warp(block.timestamp + 1 hours);
        attacker.arm(abi.encodeCall(settlement.withdraw, (nodeId)), false);
        assertEq(attacker.withdraw(), 300);
        assertEq(attacker.lastRevert(), GUARD);
        assertEq(token.balanceOf(address(attacker)), 300, "paid once");
        assertEq(settlement.escrowOf(address(attacker), nodeId).balance, 500);
        _solvent();
    }

    function test_depositCannotBeReenteredFromTheSendHook() public {
        token.mint(address(attacker), 1_000);
        // during transferFrom the token calls the attacker (the sender) before moving the balance
        attacker.arm(abi.encodeCall(settlement.deposit, (nodeId, 400)), false);
        attacker.approveAndDeposit(600);
        assertEq(attacker.lastRevert(), GUARD);
        assertEq(settlement.escrowOf(address(attacker), nodeId).balance, 600, "credited what arrived, once");
        assertEq(settlement.totalEscrowed(), 600);
        _solvent();
    }

    function test_settleBatchCannotBeReenteredDuringAPayout() public {
        // the attacker is the node's signer too, and tries to settle from inside a claim
        vm.prank(operator);
        nodes.rotateSigner(nodeId, address(attacker));
        signer = address(attacker);
        _creditAttacker(700);
        bytes32 root = keccak256("inner");
        UsageSettlement.Debit[] memory none;
        UsageSettlement.Credit[] memory noCredits;
        attacker.arm(
            abi.encodeCall(
                settlement.settleBatch, (nodeId, settlement.computeBatchId(nodeId, root), root, 1, none, noCredits)
            ),
            false
        );
        attacker.claim();
        assertEq(attacker.lastRevert(), GUARD);
        assertFalse(settlement.isSettled(nodeId, settlement.computeBatchId(nodeId, root)));
        _solvent();
    }

    function test_aBubbledReentryRevertsTheWholeCall() public {
        _creditAttacker(1_000);
        attacker.arm(abi.encodeCall(settlement.claim, ()), true);
        vm.expectRevert(ReentrancyGuard.ReentrancyGuardReentrantCall.selector);
        attacker.claim();
        assertEq(settlement.claimable(address(attacker)), 1_000, "nothing changed");
        assertEq(token.balanceOf(address(attacker)), 0);
        _solvent();
    }
}
