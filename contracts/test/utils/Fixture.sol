// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./Test.sol";
import {TestToken} from "../../src/TestToken.sol";
import {DatanetRegistry} from "../../src/DatanetRegistry.sol";
import {AdapterRegistry} from "../../src/AdapterRegistry.sol";
import {NodeRegistry} from "../../src/NodeRegistry.sol";
import {UsageSettlement} from "../../src/UsageSettlement.sol";

/// @dev The batch Merkle tree of docs/formats.md: leaves sorted ascending and distinct, inner node =
///      keccak256(min ‖ max), levels built pairwise left to right, an odd last node carried up.
library BatchTree {
    function sortLeaves(bytes32[] memory leaves) internal pure returns (bytes32[] memory sorted) {
        sorted = new bytes32[](leaves.length);
        for (uint256 i = 0; i < leaves.length; ++i) {
            bytes32 x = leaves[i];
            uint256 j = i;
            while (j > 0 && sorted[j - 1] > x) {
                sorted[j] = sorted[j - 1];
                --j;
            }
            sorted[j] = x;
        }
        for (uint256 i = 1; i < sorted.length; ++i) {
            require(sorted[i] != sorted[i - 1], "BatchTree: duplicate leaf");
        }
    }

    function hashPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }

    function _up(bytes32[] memory level) private pure returns (bytes32[] memory next) {
        next = new bytes32[]((level.length + 1) / 2);
        for (uint256 i = 0; i < level.length; i += 2) {
            next[i / 2] = i + 1 < level.length ? hashPair(level[i], level[i + 1]) : level[i];
        }
    }

    /// @dev Root over `leaves` (any order; sorted here).
    function root(bytes32[] memory leaves) internal pure returns (bytes32) {
        require(leaves.length > 0, "BatchTree: no leaves");
        bytes32[] memory level = sortLeaves(leaves);
        while (level.length > 1) {
            level = _up(level);
        }
        return level[0];
    }

    /// @dev Proof of `leaf` (which must be among `leaves`).
    function proof(bytes32[] memory leaves, bytes32 leaf) internal pure returns (bytes32[] memory out) {
        bytes32[] memory level = sortLeaves(leaves);
        uint256 idx = type(uint256).max;
        for (uint256 i = 0; i < level.length; ++i) {
            if (level[i] == leaf) idx = i;
        }
        require(idx != type(uint256).max, "BatchTree: leaf not in tree");
        bytes32[] memory buf = new bytes32[](256);
        uint256 n;
        while (level.length > 1) {
            uint256 sib = idx ^ 1;
            if (sib < level.length) buf[n++] = level[sib];
            level = _up(level);
            idx /= 2;
        }
        out = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            out[i] = buf[i];
        }
    }
}

/// @dev Deploys the whole system and offers the signing helpers the suites share.
abstract contract Fixture is Test {
    uint64 internal constant THAW = 1 days;
    string internal constant BASE = "smollm2-135m-instruct";

    TestToken internal token;
    DatanetRegistry internal datanets;
    AdapterRegistry internal adapters;
    NodeRegistry internal nodes;
    UsageSettlement internal settlement;

    address internal admin;
    address internal operator;
    address internal signer;
    uint256 internal signerKey;
    address internal payer;
    uint256 internal payerKey;
    address internal stranger;
    address internal adapterOwner;
    address internal contributor;
    uint256 internal nodeId;

    function setUp() public virtual {
        admin = makeAddr("admin");
        operator = makeAddr("operator");
        (signer, signerKey) = makeAddrAndKey("signer");
        (payer, payerKey) = makeAddrAndKey("payer");
        stranger = makeAddr("stranger");
        adapterOwner = makeAddr("adapterOwner");
        contributor = makeAddr("contributor");
        vm.warp(1_700_000_000);

        token = new TestToken("Test USD", "tUSD", 6);
        datanets = new DatanetRegistry();
        adapters = new AdapterRegistry(datanets);
        nodes = new NodeRegistry();
        settlement = new UsageSettlement(token, nodes, THAW, admin);

        vm.prank(operator);
        nodeId = nodes.registerNode(signer, "https://node.example", BASE);
    }

    // ---------------------------------------------------------------- money

    function fund(address who, uint256 amount) internal {
        token.mint(who, amount);
        vm.startPrank(who);
        token.approve(address(settlement), amount);
        settlement.deposit(nodeId, amount);
        vm.stopPrank();
    }

    // ---------------------------------------------------------------- vouchers

    function voucher(uint256 key, uint256 node, uint256 value) internal view returns (UsageSettlement.SignedVoucher memory sv) {
        sv.voucher = UsageSettlement.Voucher({
            payer: vm.addr(key), nodeId: node, cumulativeValue: value, timestamp: uint64(block.timestamp)
        });
        sv.signature = signDigest(key, this.hashVoucherExt(sv.voucher));
    }

    function hashVoucherExt(UsageSettlement.Voucher calldata v) external view returns (bytes32) {
        return settlement.hashVoucher(v);
    }

    function debit(uint256 key, uint256 value, uint256 amount) internal view returns (UsageSettlement.Debit memory d) {
        d.sv = voucher(key, nodeId, value);
        d.amount = amount;
    }

    function oneDebit(uint256 key, uint256 value, uint256 amount)
        internal
        view
        returns (UsageSettlement.Debit[] memory ds)
    {
        ds = new UsageSettlement.Debit[](1);
        ds[0] = debit(key, value, amount);
    }

    function oneCredit(address payee, uint256 amount) internal pure returns (UsageSettlement.Credit[] memory cs) {
        cs = new UsageSettlement.Credit[](1);
        cs[0] = UsageSettlement.Credit({payee: payee, amount: amount});
    }

    /// @dev Credits split as the ledger does: owner and contributors rounded down, the rest to the operator.
    function splitCredits(uint256 amount, uint16 ownerBps, uint16 contributorsBps)
        internal
        view
        returns (UsageSettlement.Credit[] memory cs)
    {
        cs = new UsageSettlement.Credit[](3);
        uint256 o = amount * ownerBps / 10_000;
        uint256 c = amount * contributorsBps / 10_000;
        cs[0] = UsageSettlement.Credit({payee: adapterOwner, amount: o});
        cs[1] = UsageSettlement.Credit({payee: contributor, amount: c});
        cs[2] = UsageSettlement.Credit({payee: operator, amount: amount - o - c});
    }

    // ---------------------------------------------------------------- batches

    uint256 private _salt;

    /// @dev A fresh root (one-leaf tree) so each call makes a new batch.
    function freshRoot() internal returns (bytes32) {
        return settlement.receiptLeaf(keccak256(abi.encode("receipt", ++_salt)));
    }

    function settle(UsageSettlement.Debit[] memory ds, UsageSettlement.Credit[] memory cs)
        internal
        returns (bytes32 batchId, bytes32 root)
    {
        root = freshRoot();
        batchId = settlement.computeBatchId(nodeId, root);
        vm.prank(signer);
        settlement.settleBatch(nodeId, batchId, root, 1, ds, cs);
    }

    // ---------------------------------------------------------------- receipts

    function receipt(uint256 i, address who) internal view returns (UsageSettlement.Receipt memory r) {
        uint256[] memory ids = new uint256[](2);
        ids[0] = 1;
        ids[1] = 2 + i;
        r = UsageSettlement.Receipt({
            requestId: keccak256(abi.encodePacked("req-", i)),
            payer: who,
            nodeId: nodeId,
            adapterIds: ids,
            inputTokens: uint64(100 + i),
            outputTokens: uint64(50 + i),
            cost: 1000 + i,
            attributionDigest: keccak256(abi.encodePacked("attr-", i)),
            timestamp: uint64(block.timestamp)
        });
    }

    function hashReceiptExt(UsageSettlement.Receipt calldata r) external view returns (bytes32) {
        return settlement.hashReceipt(r);
    }

    function receiptDigest(UsageSettlement.Receipt memory r) internal view returns (bytes32) {
        return this.hashReceiptExt(r);
    }

    /// @dev EIP-712 digest of a receipt computed independently of the contract (the doc's encoding).
    function receiptDigestByHand(UsageSettlement.Receipt memory r) internal view returns (bytes32) {
        bytes32 typeHash = keccak256(
            "Receipt(bytes32 requestId,address payer,uint256 nodeId,uint256[] adapterIds,uint64 inputTokens,uint64 outputTokens,uint256 cost,bytes32 attributionDigest,uint64 timestamp)"
        );
        bytes memory head = abi.encode(typeHash, r.requestId, r.payer, r.nodeId, keccak256(abi.encodePacked(r.adapterIds)));
        bytes memory tail = abi.encode(r.inputTokens, r.outputTokens, r.cost, r.attributionDigest, r.timestamp);
        bytes32 structHash = keccak256(bytes.concat(head, tail));
        return keccak256(abi.encodePacked("\x19\x01", domainSeparatorByHand(), structHash));
    }

    function domainSeparatorByHand() internal view returns (bytes32) {
        return keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("OpenLoRA"),
                keccak256("1"),
                block.chainid,
                address(settlement)
            )
        );
    }
}
