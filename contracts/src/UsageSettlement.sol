// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

import {NodeRegistry} from "./NodeRegistry.sol";

/// @title UsageSettlement
/// @notice Escrowed, batched payment for inference. A payer escrows an ERC-20 per node and signs
///         cumulative EIP-712 vouchers (TAP style: each voucher states everything the payer owes the
///         node so far). The node's current signer settles batches of served requests: each batch
///         commits to the Merkle root of the node-signed receipts it covers, debits each payer by at
///         most the part of their latest voucher not yet collected, and credits the same total to the
///         payees (adapter owners, Datanet contributors, the node operator), who pull it with `claim`.
///         Withdrawals thaw for `thawingPeriod` seconds, during which the node can still settle.
/// @dev Formats (domain, types, Merkle rules, batch id) are defined in docs/formats.md.
contract UsageSettlement is EIP712, Ownable, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice EIP-712 type hash of a payer's voucher.
    bytes32 public constant VOUCHER_TYPEHASH =
        keccak256("Voucher(address payer,uint256 nodeId,uint256 cumulativeValue,uint64 timestamp)");
    /// @notice EIP-712 type hash of a node's per-request receipt.
    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 requestId,address payer,uint256 nodeId,uint256[] adapterIds,uint64 inputTokens,uint64 outputTokens,uint256 cost,bytes32 attributionDigest,uint64 timestamp)"
    );
    /// @notice Lower bound of the thawing period, in seconds.
    uint64 public constant MIN_THAWING_PERIOD = 1 minutes;
    /// @notice Upper bound of the thawing period, in seconds.
    uint64 public constant MAX_THAWING_PERIOD = 30 days;

    /// @notice A payer's promise: everything owed to `nodeId` so far is `cumulativeValue`.
    struct Voucher {
        address payer;
        uint256 nodeId;
        uint256 cumulativeValue;
        uint64 timestamp;
    }

    /// @notice A voucher with the payer's EIP-712 signature (65 bytes, or ERC-1271 for contract payers).
    struct SignedVoucher {
        Voucher voucher;
        bytes signature;
    }

    /// @notice One payer's debit in a batch, authorised by their latest voucher.
    struct Debit {
        SignedVoucher sv;
        uint256 amount;
    }

    /// @notice One payee's credit in a batch.
    struct Credit {
        address payee;
        uint256 amount;
    }

    /// @notice One served request as signed by the node (the Merkle leaves of a batch).
    struct Receipt {
        bytes32 requestId;
        address payer;
        uint256 nodeId;
        uint256[] adapterIds;
        uint64 inputTokens;
        uint64 outputTokens;
        uint256 cost;
        bytes32 attributionDigest;
        uint64 timestamp;
    }

    /// @notice A payer's escrow with one node; `thawing` of `balance` becomes withdrawable at `thawEnd`.
    struct Escrow {
        uint256 balance;
        uint256 thawing;
        uint64 thawEnd;
    }

    /// @notice A settled batch (two storage slots; the batch total is in the BatchSettled event).
    struct Batch {
        bytes32 root;
        address signer;
        uint32 receiptCount;
        uint64 settledAt;
    }

    /// @notice An address argument was zero.
    error ZeroAddress();
    /// @notice An amount argument was zero.
    error ZeroAmount();
    /// @notice The node `nodeId` is not registered.
    error UnknownNode(uint256 nodeId);
    /// @notice The node `nodeId` was deactivated.
    error NodeInactive(uint256 nodeId);
    /// @notice Only the node's current signer may settle for it.
    error NotNodeSigner(uint256 nodeId, address caller);
    /// @notice The escrow holds `available`, less than `requested`.
    error InsufficientEscrow(address payer, uint256 nodeId, uint256 available, uint256 requested);
    /// @notice `withdraw` without a pending withdrawal request.
    error NoWithdrawalRequested(address payer, uint256 nodeId);
    /// @notice The pending withdrawal thaws at `thawEnd`; it is `nowTs`.
    error StillThawing(uint64 thawEnd, uint256 nowTs);
    /// @notice The thawing period must lie in [MIN_THAWING_PERIOD, MAX_THAWING_PERIOD].
    error ThawingPeriodOutOfBounds(uint64 period);
    /// @notice A batch needs a non-zero root and at least one receipt.
    error EmptyBatch();
    /// @notice The batch id must be keccak256(abi.encode(nodeId, root)).
    error BadBatchId(bytes32 expected, bytes32 given);
    /// @notice This batch was settled already.
    error BatchAlreadySettled(uint256 nodeId, bytes32 batchId);
    /// @notice A voucher for another node was offered.
    error VoucherNodeMismatch(uint256 nodeId, uint256 voucherNodeId);
    /// @notice The voucher's signature does not belong to its payer.
    error InvalidVoucherSignature(address payer);
    /// @notice The debit exceeds what the voucher still allows (cumulativeValue - collected).
    error VoucherExceeded(address payer, uint256 cumulativeValue, uint256 collected, uint256 amount);
    /// @notice The debits and credits of a batch differ.
    error UnbalancedBatch(uint256 debited, uint256 credited);
    /// @notice The caller has no credit to claim.
    error NothingToClaim(address payee);

    /// @notice `payer` escrowed `amount` for `nodeId`; the escrow now holds `balance`.
    event Deposited(address indexed payer, uint256 indexed nodeId, uint256 amount, uint256 balance);
    /// @notice `payer` asked to withdraw `amount` from the `nodeId` escrow, available from `thawEnd`.
    event WithdrawalRequested(address indexed payer, uint256 indexed nodeId, uint256 amount, uint64 thawEnd);
    /// @notice `payer` cancelled their pending withdrawal.
    event WithdrawalCancelled(address indexed payer, uint256 indexed nodeId);
    /// @notice `payer` withdrew `amount` from the `nodeId` escrow.
    event Withdrawn(address indexed payer, uint256 indexed nodeId, uint256 amount);
    /// @notice The thawing period changed.
    event ThawingPeriodSet(uint64 oldPeriod, uint64 newPeriod);
    /// @notice A batch debited `payer` by `amount`; `collected` is now collected-so-far for the pair.
    event Debited(
        uint256 indexed nodeId, bytes32 indexed batchId, address indexed payer, uint256 amount, uint256 collected
    );
    /// @notice A batch credited `payee` with `amount`.
    event Credited(uint256 indexed nodeId, bytes32 indexed batchId, address indexed payee, uint256 amount);
    /// @notice A batch was settled by `signer`.
    event BatchSettled(
        uint256 indexed nodeId,
        bytes32 indexed batchId,
        address indexed signer,
        bytes32 root,
        uint32 receiptCount,
        uint256 total
    );
    /// @notice `payee` claimed `amount`.
    event Claimed(address indexed payee, uint256 amount);

    /// @notice The ERC-20 all amounts are denominated in.
    IERC20 public immutable token;
    /// @notice Where node signers are looked up.
    NodeRegistry public immutable nodes;
    /// @notice Seconds a withdrawal request waits before `withdraw` pays out.
    uint64 public thawingPeriod;
    /// @notice Sum of all escrow balances.
    uint256 public totalEscrowed;
    /// @notice Sum of all credits not yet claimed.
    uint256 public totalUnclaimed;

    mapping(address payer => mapping(uint256 nodeId => Escrow)) private _escrows;
    /// @notice Collected-so-far per (payer, node): the part of the payer's vouchers already paid.
    mapping(address payer => mapping(uint256 nodeId => uint256)) public collected;
    /// @notice Unclaimed credit per payee.
    mapping(address payee => uint256) public claimable;
    mapping(uint256 nodeId => mapping(bytes32 batchId => Batch)) private _batches;

    /// @param token_ the ERC-20 of escrows and payouts
    /// @param nodes_ the node registry (signers)
    /// @param thawingPeriod_ seconds a withdrawal thaws, within the bounds
    /// @param owner_ who may change the thawing period
    constructor(IERC20 token_, NodeRegistry nodes_, uint64 thawingPeriod_, address owner_)
        EIP712("OpenLoRA", "1")
        Ownable(owner_)
    {
        if (address(token_) == address(0) || address(nodes_) == address(0)) revert ZeroAddress();
        _checkThawingPeriod(thawingPeriod_);
        token = token_;
        nodes = nodes_;
        thawingPeriod = thawingPeriod_;
        emit ThawingPeriodSet(0, thawingPeriod_);
    }

    // ------------------------------------------------------------------ escrow

    /// @notice Escrows `amount` of the token from the caller for `nodeId` (approve first). The amount
    ///         actually received is credited, so fee-on-transfer tokens cannot inflate escrow.
    /// @param nodeId an active node
    /// @param amount base units to pull from the caller (non-zero)
    function deposit(uint256 nodeId, uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        (address signer, bool active) = nodes.signerAndStatus(nodeId);
        if (signer == address(0)) revert UnknownNode(nodeId);
        if (!active) revert NodeInactive(nodeId);
        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = token.balanceOf(address(this)) - before;
        Escrow storage e = _escrows[msg.sender][nodeId];
        e.balance += received;
        totalEscrowed += received;
        emit Deposited(msg.sender, nodeId, received, e.balance);
    }

    /// @notice Starts (or restarts) thawing `amount` of the caller's escrow with `nodeId`; it becomes
    ///         withdrawable after `thawingPeriod`. The node can still settle against it meanwhile.
    /// @param nodeId the node
    /// @param amount base units to thaw (non-zero, at most the escrow balance); replaces a pending request
    function requestWithdrawal(uint256 nodeId, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Escrow storage e = _escrows[msg.sender][nodeId];
        if (amount > e.balance) revert InsufficientEscrow(msg.sender, nodeId, e.balance, amount);
        uint64 thawEnd = uint64(block.timestamp) + thawingPeriod;
        e.thawing = amount;
        e.thawEnd = thawEnd;
        emit WithdrawalRequested(msg.sender, nodeId, amount, thawEnd);
    }

    /// @notice Cancels the caller's pending withdrawal with `nodeId`.
    /// @param nodeId the node
    function cancelWithdrawal(uint256 nodeId) external {
        Escrow storage e = _escrows[msg.sender][nodeId];
        if (e.thawEnd == 0) revert NoWithdrawalRequested(msg.sender, nodeId);
        e.thawing = 0;
        e.thawEnd = 0;
        emit WithdrawalCancelled(msg.sender, nodeId);
    }

    /// @notice Pays out the caller's thawed withdrawal with `nodeId`: the requested amount, or what is
    ///         left of the escrow if settlements took part of it meanwhile.
    /// @param nodeId the node
    /// @return amount base units sent to the caller
    function withdraw(uint256 nodeId) external nonReentrant returns (uint256 amount) {
        Escrow storage e = _escrows[msg.sender][nodeId];
        uint64 thawEnd = e.thawEnd;
        if (thawEnd == 0) revert NoWithdrawalRequested(msg.sender, nodeId);
        // forge-lint: disable-next-line(block-timestamp) thawing is measured in hours or days, not seconds
        if (block.timestamp < thawEnd) revert StillThawing(thawEnd, block.timestamp);
        amount = e.thawing < e.balance ? e.thawing : e.balance;
        e.balance -= amount;
        e.thawing = 0;
        e.thawEnd = 0;
        totalEscrowed -= amount;
        emit Withdrawn(msg.sender, nodeId, amount);
        if (amount != 0) token.safeTransfer(msg.sender, amount);
    }

    /// @notice Sets the thawing period for future withdrawal requests; owner only.
    /// @param period seconds, within [MIN_THAWING_PERIOD, MAX_THAWING_PERIOD]
    function setThawingPeriod(uint64 period) external onlyOwner {
        _checkThawingPeriod(period);
        emit ThawingPeriodSet(thawingPeriod, period);
        thawingPeriod = period;
    }

    // ------------------------------------------------------------------ settlement

    /// @notice Settles a batch of served requests for `nodeId`; callable by the node's current signer only.
    /// @param nodeId the node (active)
    /// @param batchId keccak256(abi.encode(nodeId, root)); each batch settles once
    /// @param root Merkle root of the node-signed receipts the batch covers (docs/formats.md)
    /// @param receiptCount how many receipts the batch covers (non-zero)
    /// @param debits per payer: the latest signed voucher and the amount to take now
    ///        (<= cumulativeValue - collected, <= escrow balance)
    /// @param credits per payee: the amount credited; sums to the debits' total
    function settleBatch(
        uint256 nodeId,
        bytes32 batchId,
        bytes32 root,
        uint32 receiptCount,
        Debit[] calldata debits,
        Credit[] calldata credits
    ) external nonReentrant {
        (address signer, bool active) = nodes.signerAndStatus(nodeId);
        if (signer == address(0)) revert UnknownNode(nodeId);
        if (msg.sender != signer) revert NotNodeSigner(nodeId, msg.sender);
        if (!active) revert NodeInactive(nodeId);
        if (root == bytes32(0) || receiptCount == 0) revert EmptyBatch();
        bytes32 expected = computeBatchId(nodeId, root);
        if (batchId != expected) revert BadBatchId(expected, batchId);
        Batch storage b = _batches[nodeId][batchId];
        if (b.settledAt != 0) revert BatchAlreadySettled(nodeId, batchId);

        uint256 debited;
        for (uint256 i = 0; i < debits.length; ++i) {
            debited += _applyDebit(nodeId, batchId, debits[i]);
        }
        uint256 credited;
        for (uint256 i = 0; i < credits.length; ++i) {
            credited += _applyCredit(nodeId, batchId, credits[i]);
        }
        if (debited != credited) revert UnbalancedBatch(debited, credited);
        totalEscrowed -= debited;
        totalUnclaimed += credited;

        b.root = root;
        b.signer = signer;
        b.receiptCount = receiptCount;
        b.settledAt = uint64(block.timestamp);
        emit BatchSettled(nodeId, batchId, signer, root, receiptCount, debited);
    }

    /// @notice Sends the caller all of their unclaimed credit.
    /// @return amount base units sent
    function claim() external nonReentrant returns (uint256 amount) {
        amount = claimable[msg.sender];
        if (amount == 0) revert NothingToClaim(msg.sender);
        claimable[msg.sender] = 0;
        totalUnclaimed -= amount;
        emit Claimed(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // ------------------------------------------------------------------ views

    /// @notice Whether `receipt` is covered by the settled batch `batchId` of `nodeId`: its signature
    ///         recovers to the signer recorded for the batch and its leaf is under the batch root.
    /// @param nodeId the node
    /// @param batchId the batch
    /// @param receipt the receipt (its nodeId must be `nodeId`)
    /// @param signature the node signer's 65-byte signature of the receipt's EIP-712 digest
    /// @param proof Merkle proof of the receipt's leaf (sibling hashes, bottom up)
    /// @return true when the receipt is in the batch and signed by the batch's signer
    function verifyReceipt(
        uint256 nodeId,
        bytes32 batchId,
        Receipt calldata receipt,
        bytes calldata signature,
        bytes32[] calldata proof
    ) external view returns (bool) {
        Batch storage b = _batches[nodeId][batchId];
        if (b.settledAt == 0 || receipt.nodeId != nodeId) return false;
        bytes32 digest = hashReceipt(receipt);
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, signature);
        if (err != ECDSA.RecoverError.NoError || recovered != b.signer) return false;
        return MerkleProof.verifyCalldata(proof, b.root, receiptLeaf(digest));
    }

    /// @notice The EIP-712 digest a payer signs for `voucher`.
    /// @param voucher the voucher
    /// @return the typed-data digest
    function hashVoucher(Voucher calldata voucher) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(VOUCHER_TYPEHASH, voucher.payer, voucher.nodeId, voucher.cumulativeValue, voucher.timestamp)
            )
        );
    }

    /// @notice The EIP-712 digest a node signer signs for `receipt`.
    /// @param receipt the receipt
    /// @return the typed-data digest
    function hashReceipt(Receipt calldata receipt) public view returns (bytes32) {
        bytes32 head = keccak256(
            abi.encodePacked(
                abi.encode(
                    RECEIPT_TYPEHASH,
                    receipt.requestId,
                    receipt.payer,
                    receipt.nodeId,
                    keccak256(abi.encodePacked(receipt.adapterIds))
                ),
                abi.encode(
                    receipt.inputTokens,
                    receipt.outputTokens,
                    receipt.cost,
                    receipt.attributionDigest,
                    receipt.timestamp
                )
            )
        );
        return _hashTypedDataV4(head);
    }

    /// @notice The Merkle leaf of a receipt digest: keccak256(bytes.concat(keccak256(abi.encode(digest)))).
    /// @param digest a receipt's EIP-712 digest
    /// @return the leaf
    function receiptLeaf(bytes32 digest) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(digest))));
    }

    /// @notice The id of the batch of `nodeId` with Merkle root `root`.
    /// @param nodeId the node
    /// @param root the batch's Merkle root
    /// @return keccak256(abi.encode(nodeId, root))
    function computeBatchId(uint256 nodeId, bytes32 root) public pure returns (bytes32) {
        return keccak256(abi.encode(nodeId, root));
    }

    /// @notice The EIP-712 domain separator (name "OpenLoRA", version "1", this chain, this contract).
    /// @return the separator
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice A payer's escrow with a node.
    /// @param payer the payer
    /// @param nodeId the node
    /// @return the escrow (balance, thawing amount, thaw end; zeros when none)
    function escrowOf(address payer, uint256 nodeId) external view returns (Escrow memory) {
        return _escrows[payer][nodeId];
    }

    /// @notice A settled batch (all zero when not settled).
    /// @param nodeId the node
    /// @param batchId the batch
    /// @return the batch record
    function getBatch(uint256 nodeId, bytes32 batchId) external view returns (Batch memory) {
        return _batches[nodeId][batchId];
    }

    /// @notice Whether the batch was settled.
    /// @param nodeId the node
    /// @param batchId the batch
    /// @return true when settled
    function isSettled(uint256 nodeId, bytes32 batchId) external view returns (bool) {
        return _batches[nodeId][batchId].settledAt != 0;
    }

    // ------------------------------------------------------------------ internals

    function _applyDebit(uint256 nodeId, bytes32 batchId, Debit calldata d) private returns (uint256 amount) {
        Voucher calldata v = d.sv.voucher;
        if (v.nodeId != nodeId) revert VoucherNodeMismatch(nodeId, v.nodeId);
        address payer = v.payer;
        if (!SignatureChecker.isValidSignatureNowCalldata(payer, hashVoucher(v), d.sv.signature)) {
            revert InvalidVoucherSignature(payer);
        }
        amount = d.amount;
        uint256 done = collected[payer][nodeId];
        if (v.cumulativeValue < done || amount > v.cumulativeValue - done) {
            revert VoucherExceeded(payer, v.cumulativeValue, done, amount);
        }
        Escrow storage e = _escrows[payer][nodeId];
        if (amount > e.balance) revert InsufficientEscrow(payer, nodeId, e.balance, amount);
        e.balance -= amount;
        collected[payer][nodeId] = done + amount;
        emit Debited(nodeId, batchId, payer, amount, done + amount);
    }

    function _applyCredit(uint256 nodeId, bytes32 batchId, Credit calldata c) private returns (uint256) {
        if (c.payee == address(0)) revert ZeroAddress();
        claimable[c.payee] += c.amount;
        emit Credited(nodeId, batchId, c.payee, c.amount);
        return c.amount;
    }

    function _checkThawingPeriod(uint64 period) private pure {
        if (period < MIN_THAWING_PERIOD || period > MAX_THAWING_PERIOD) revert ThawingPeriodOutOfBounds(period);
    }
}
