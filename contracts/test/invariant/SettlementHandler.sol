// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "../utils/Test.sol";
import {TestToken} from "../../src/TestToken.sol";
import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {UsageSettlement} from "../../src/UsageSettlement.sol";

/// @dev What the invariant fuzzer drives: payers deposit, thaw, cancel and withdraw; the node settles
///      batches (honest ones, and attempts that must fail: over the voucher, replayed batch ids, the
///      wrong sender); the operator rotates the signer; payees claim; time moves; the owner retunes the
///      thawing period. Ghost variables record what went in and out, and any forbidden success.
contract SettlementHandler is TestBase {
    uint256 internal constant PAYERS = 3;
    uint256 internal constant PAYEES = 4;

    UsageSettlement public immutable settlement;
    TestToken public immutable token;
    NodeRegistry public immutable nodes;
    uint256 public immutable nodeId;
    address public immutable operator;
    address public immutable admin;

    uint256 public signerKey;
    uint256[] internal _oldSignerKeys;
    uint256[PAYERS] internal _payerKeys;
    address[PAYERS] internal _payers;
    address[PAYEES] internal _payees;
    bytes32[] internal _settledRoots;
    uint256 internal _salt;

    // money in and out
    uint256 public ghostDeposited;
    uint256 public ghostWithdrawn;
    uint256 public ghostDebited;
    uint256 public ghostCredited;
    uint256 public ghostClaimed;
    mapping(address payer => uint256) public highestVoucher;

    // forbidden outcomes (must stay 0)
    uint256 public doubleSettles;
    uint256 public unauthorizedSettles;
    uint256 public earlyWithdrawals;
    uint256 public overVoucherSettles;
    uint256 public overEscrowSettles;
    uint256 public payoutMismatches;
    uint256 public honestSettleFailures;

    // coverage
    mapping(bytes32 action => uint256) public calls;

    constructor(UsageSettlement s, TestToken t, NodeRegistry n, uint256 node, address op, uint256 key, address owner_) {
        settlement = s;
        token = t;
        nodes = n;
        nodeId = node;
        operator = op;
        signerKey = key;
        admin = owner_;
        for (uint256 i = 0; i < PAYERS; ++i) {
            _payerKeys[i] = uint256(keccak256(abi.encode("invariant-payer", i)));
            _payers[i] = vm.addr(_payerKeys[i]);
        }
        for (uint256 i = 0; i < PAYEES; ++i) {
            _payees[i] = vm.addr(uint256(keccak256(abi.encode("invariant-payee", i))));
        }
    }

    function payers() external view returns (address[PAYERS] memory) {
        return _payers;
    }

    function payees() external view returns (address[PAYEES] memory) {
        return _payees;
    }

    function signer() public view returns (address) {
        return vm.addr(signerKey);
    }

    // ------------------------------------------------------------------ payers

    function deposit(uint256 who, uint256 amount) external {
        calls["deposit"]++;
        address p = _payers[who % PAYERS];
        amount = bound(amount, 1, 1e24);
        token.mint(p, amount);
        vm.startPrank(p);
        token.approve(address(settlement), amount);
        settlement.deposit(nodeId, amount);
        vm.stopPrank();
        ghostDeposited += amount;
    }

    function requestWithdrawal(uint256 who, uint256 amount) external {
        calls["requestWithdrawal"]++;
        address p = _payers[who % PAYERS];
        uint256 bal = settlement.escrowOf(p, nodeId).balance;
        if (bal == 0) return;
        vm.prank(p);
        settlement.requestWithdrawal(nodeId, bound(amount, 1, bal));
    }

    function cancelWithdrawal(uint256 who) external {
        calls["cancelWithdrawal"]++;
        address p = _payers[who % PAYERS];
        if (settlement.escrowOf(p, nodeId).thawEnd == 0) return;
        vm.prank(p);
        settlement.cancelWithdrawal(nodeId);
    }

    function withdraw(uint256 who) external {
        calls["withdraw"]++;
        address p = _payers[who % PAYERS];
        UsageSettlement.Escrow memory e = settlement.escrowOf(p, nodeId);
        uint256 before = token.balanceOf(p);
        vm.prank(p);
        try settlement.withdraw(nodeId) returns (uint256 got) {
            if (e.thawEnd == 0 || block.timestamp < e.thawEnd) earlyWithdrawals++;
            if (token.balanceOf(p) != before + got) payoutMismatches++;
            ghostWithdrawn += got;
            calls["withdraw.paid"]++;
        } catch {}
    }

    // ------------------------------------------------------------------ node

    function _voucher(uint256 payerIdx, uint256 value) internal returns (UsageSettlement.SignedVoucher memory sv) {
        sv.voucher = UsageSettlement.Voucher({
            payer: _payers[payerIdx], nodeId: nodeId, cumulativeValue: value, timestamp: uint64(block.timestamp)
        });
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(_payerKeys[payerIdx], settlement.hashVoucher(sv.voucher));
        sv.signature = abi.encodePacked(r, s, v);
        if (value > highestVoucher[_payers[payerIdx]]) highestVoucher[_payers[payerIdx]] = value;
    }

    function _credits(uint256 total, uint256 seed) internal view returns (UsageSettlement.Credit[] memory cs) {
        cs = new UsageSettlement.Credit[](PAYEES);
        uint256 left = total;
        for (uint256 j = 0; j < PAYEES; ++j) {
            uint256 part = j + 1 == PAYEES ? left : uint256(keccak256(abi.encode(seed, j))) % (left + 1);
            cs[j] = UsageSettlement.Credit({payee: _payees[(seed % PAYEES + j) % PAYEES], amount: part});
            left -= part;
        }
    }

    function _newRoot() internal returns (bytes32) {
        return keccak256(abi.encode("root", ++_salt));
    }

    /// Sends a batch with a fresh root as `sender`; true when it settled.
    function _submit(address sender, uint32 count, UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs)
        internal
        returns (bool ok)
    {
        bytes32 root = _newRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        vm.prank(sender);
        try settlement.settleBatch(nodeId, batchId, root, count, ds, cs) {
            _settledRoots.push(root);
            ok = true;
        } catch {}
    }

    /// An honest batch: each payer is debited part of what their escrow holds, under a fresh voucher
    /// whose cumulative value covers it (sometimes with slack left for later).
    function settle(uint256 seed) external {
        calls["settle"]++;
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](PAYERS);
        uint256 total;
        for (uint256 i = 0; i < PAYERS; ++i) {
            uint256 bal = settlement.escrowOf(_payers[i], nodeId).balance;
            uint256 amount = uint256(keccak256(abi.encode(seed, "amount", i))) % (bal + 1);
            uint256 slack = seed % 3 == 0 ? uint256(keccak256(abi.encode(seed, "slack", i))) % 1e20 : 0;
            uint256 done = settlement.collected(_payers[i], nodeId);
            ds[i].sv = _voucher(i, done + amount + slack);
            ds[i].amount = amount;
            total += amount;
        }
        if (!_submit(signer(), uint32(1 + seed % 50), ds, _credits(total, seed))) {
            honestSettleFailures++;
            return;
        }
        ghostDebited += total;
        ghostCredited += total;
    }

    /// Re-signs nothing: spends the slack of a payer's highest voucher, if any (a later batch using an
    /// earlier voucher, which is how TAP-style vouchers are meant to be used).
    function settleOnOldVoucher(uint256 who, uint256 amount) external {
        calls["settleOnOldVoucher"]++;
        uint256 i = who % PAYERS;
        address p = _payers[i];
        uint256 room = highestVoucher[p] - settlement.collected(p, nodeId);
        uint256 bal = settlement.escrowOf(p, nodeId).balance;
        uint256 cap = room < bal ? room : bal;
        amount = bound(amount, 0, cap);
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
        ds[0].sv = _voucher(i, highestVoucher[p]);
        ds[0].amount = amount;
        if (!_submit(signer(), 1, ds, _credits(amount, amount))) {
            honestSettleFailures++;
            return;
        }
        ghostDebited += amount;
        ghostCredited += amount;
    }

    /// Must fail: a debit larger than the voucher leaves.
    function settleOverVoucher(uint256 who, uint256 extra) external {
        calls["settleOverVoucher"]++;
        uint256 i = who % PAYERS;
        address p = _payers[i];
        uint256 done = settlement.collected(p, nodeId);
        uint256 value = done + bound(extra, 0, 1e20);
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
        ds[0].sv = _voucher(i, value);
        ds[0].amount = value - done + 1;
        if (_submit(signer(), 1, ds, _credits(ds[0].amount, extra))) overVoucherSettles++;
    }

    /// Must fail: more than the escrow holds, under a voucher that would allow it.
    function settleOverEscrow(uint256 who, uint256 extra) external {
        calls["settleOverEscrow"]++;
        uint256 i = who % PAYERS;
        address p = _payers[i];
        uint256 amount = settlement.escrowOf(p, nodeId).balance + 1 + bound(extra, 0, 1e20);
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](1);
        ds[0].sv = _voucher(i, settlement.collected(p, nodeId) + amount);
        ds[0].amount = amount;
        if (_submit(signer(), 1, ds, _credits(amount, extra))) overEscrowSettles++;
    }

    /// Must fail: the same batch id again (here with nothing to pay, the cheapest possible replay).
    function replayBatch(uint256 idx) external {
        calls["replayBatch"]++;
        if (_settledRoots.length == 0) return;
        bytes32 root = _settledRoots[idx % _settledRoots.length];
        UsageSettlement.Debit[] memory none;
        UsageSettlement.Credit[] memory noCredits;
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        address current = signer();
        vm.prank(current);
        try settlement.settleBatch(nodeId, batchId, root, 1, none, noCredits) {
            doubleSettles++;
        } catch {}
    }

    /// Must fail: anyone but the current signer (old signers, the operator, payers, payees).
    function settleAsSomeoneElse(uint256 who) external {
        calls["settleAsSomeoneElse"]++;
        address[] memory others = new address[](2 + PAYERS + _oldSignerKeys.length);
        others[0] = operator;
        others[1] = _payees[who % PAYEES];
        for (uint256 i = 0; i < PAYERS; ++i) {
            others[2 + i] = _payers[i];
        }
        for (uint256 i = 0; i < _oldSignerKeys.length; ++i) {
            others[2 + PAYERS + i] = vm.addr(_oldSignerKeys[i]);
        }
        address sender = others[who % others.length];
        if (sender == signer()) return;
        UsageSettlement.Debit[] memory none;
        UsageSettlement.Credit[] memory noCredits;
        if (_submit(sender, 1, none, noCredits)) unauthorizedSettles++;
    }

    function rotateSigner(uint256 seed) external {
        calls["rotateSigner"]++;
        uint256 next = uint256(keccak256(abi.encode("signer", seed))) % 1e70 + 1;
        if (vm.addr(next) == signer()) return;
        vm.prank(operator);
        nodes.rotateSigner(nodeId, vm.addr(next));
        _oldSignerKeys.push(signerKey);
        signerKey = next;
    }

    // ------------------------------------------------------------------ payees, time, owner

    function claim(uint256 who) external {
        calls["claim"]++;
        address p = _payees[who % PAYEES];
        uint256 due = settlement.claimable(p);
        if (due == 0) return;
        uint256 before = token.balanceOf(p);
        vm.prank(p);
        uint256 got = settlement.claim();
        if (got != due || token.balanceOf(p) != before + due) payoutMismatches++;
        ghostClaimed += got;
    }

    function warp(uint256 secs) external {
        calls["warp"]++;
        vm.warp(block.timestamp + bound(secs, 0, 3 days));
    }

    function setThawingPeriod(uint256 period) external {
        calls["setThawingPeriod"]++;
        period = bound(period, settlement.MIN_THAWING_PERIOD(), settlement.MAX_THAWING_PERIOD());
        vm.prank(admin);
        settlement.setThawingPeriod(uint64(period));
    }
}
