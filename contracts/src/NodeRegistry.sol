// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title NodeRegistry
/// @notice Registry of inference nodes. An operator registers a node with a signer address (the key
///         that signs usage receipts and sends settlement batches), an endpoint URL and the base model
///         it serves. The operator can rotate the signer, change the endpoint and deactivate the node.
///         Node ids start at 1.
contract NodeRegistry {
    /// @notice One node as stored.
    struct Node {
        address operator;
        bool active;
        uint64 registeredAt;
        address signer;
        uint64 updatedAt;
        string endpoint;
        string baseModel;
    }

    /// @notice The node `nodeId` does not exist.
    error UnknownNode(uint256 nodeId);
    /// @notice `caller` is not the operator of node `nodeId`.
    error NotNodeOperator(uint256 nodeId, address caller);
    /// @notice The node `nodeId` was deactivated.
    error NodeInactive(uint256 nodeId);
    /// @notice A signer cannot be the zero address.
    error ZeroAddress();
    /// @notice A required string argument was empty.
    error EmptyString();
    /// @notice The new signer equals the current one.
    error SameSigner();

    /// @notice A node was registered.
    event NodeRegistered(
        uint256 indexed nodeId, address indexed operator, address indexed signer, string endpoint, string baseModel
    );
    /// @notice A node's signer changed; receipts and batches must come from `newSigner` from now on.
    event SignerRotated(uint256 indexed nodeId, address indexed oldSigner, address indexed newSigner);
    /// @notice A node's endpoint URL changed.
    event EndpointUpdated(uint256 indexed nodeId, string endpoint);
    /// @notice A node was deactivated; it can no longer settle.
    event NodeDeactivated(uint256 indexed nodeId);

    uint256 private _count;
    mapping(uint256 nodeId => Node) private _nodes;

    modifier onlyActiveOperator(uint256 nodeId) {
        Node storage n = _nodes[nodeId];
        if (n.operator == address(0)) revert UnknownNode(nodeId);
        if (n.operator != msg.sender) revert NotNodeOperator(nodeId, msg.sender);
        if (!n.active) revert NodeInactive(nodeId);
        _;
    }

    /// @notice Registers a node operated by the caller.
    /// @param signer the key that signs receipts and sends settlement batches
    /// @param endpoint the node's public URL (non-empty)
    /// @param baseModel the base model id the node serves (non-empty, e.g. "smollm2-135m-instruct")
    /// @return nodeId the new node's id (1, 2, ...)
    function registerNode(address signer, string calldata endpoint, string calldata baseModel)
        external
        returns (uint256 nodeId)
    {
        if (signer == address(0)) revert ZeroAddress();
        if (bytes(endpoint).length == 0 || bytes(baseModel).length == 0) revert EmptyString();
        nodeId = ++_count;
        _nodes[nodeId] = Node({
            operator: msg.sender,
            active: true,
            registeredAt: uint64(block.timestamp),
            signer: signer,
            updatedAt: uint64(block.timestamp),
            endpoint: endpoint,
            baseModel: baseModel
        });
        emit NodeRegistered(nodeId, msg.sender, signer, endpoint, baseModel);
    }

    /// @notice Replaces the node's signer; operator only, active nodes only.
    /// @dev Batches settled before the rotation keep the signer they were settled with.
    /// @param nodeId the node
    /// @param newSigner the new signer (not zero, not the current one)
    function rotateSigner(uint256 nodeId, address newSigner) external onlyActiveOperator(nodeId) {
        if (newSigner == address(0)) revert ZeroAddress();
        Node storage n = _nodes[nodeId];
        address old = n.signer;
        if (newSigner == old) revert SameSigner();
        n.signer = newSigner;
        n.updatedAt = uint64(block.timestamp);
        emit SignerRotated(nodeId, old, newSigner);
    }

    /// @notice Replaces the node's endpoint URL; operator only, active nodes only.
    /// @param nodeId the node
    /// @param endpoint the new URL (non-empty)
    function updateEndpoint(uint256 nodeId, string calldata endpoint) external onlyActiveOperator(nodeId) {
        if (bytes(endpoint).length == 0) revert EmptyString();
        Node storage n = _nodes[nodeId];
        n.endpoint = endpoint;
        n.updatedAt = uint64(block.timestamp);
        emit EndpointUpdated(nodeId, endpoint);
    }

    /// @notice Deactivates the node for good; operator only. A deactivated node cannot settle, so
    ///         settle outstanding receipts first.
    /// @param nodeId the node
    function deactivateNode(uint256 nodeId) external onlyActiveOperator(nodeId) {
        Node storage n = _nodes[nodeId];
        n.active = false;
        n.updatedAt = uint64(block.timestamp);
        emit NodeDeactivated(nodeId);
    }

    /// @notice Reads one node; reverts with UnknownNode when it does not exist.
    /// @param nodeId the node
    /// @return the stored node
    function getNode(uint256 nodeId) external view returns (Node memory) {
        Node memory n = _nodes[nodeId];
        if (n.operator == address(0)) revert UnknownNode(nodeId);
        return n;
    }

    /// @notice The node's current signer; reverts with UnknownNode when it does not exist.
    /// @param nodeId the node
    /// @return the signer address
    function signerOf(uint256 nodeId) external view returns (address) {
        Node storage n = _nodes[nodeId];
        if (n.operator == address(0)) revert UnknownNode(nodeId);
        return n.signer;
    }

    /// @notice The node's operator; reverts with UnknownNode when it does not exist.
    /// @param nodeId the node
    /// @return the operator address
    function operatorOf(uint256 nodeId) external view returns (address) {
        address operator = _nodes[nodeId].operator;
        if (operator == address(0)) revert UnknownNode(nodeId);
        return operator;
    }

    /// @notice Whether the node exists and is active.
    /// @param nodeId the node
    /// @return true when registered and not deactivated
    function isActive(uint256 nodeId) external view returns (bool) {
        return _nodes[nodeId].active;
    }

    /// @notice The signer and active flag in one call (what settlement needs).
    /// @param nodeId the node
    /// @return signer the current signer (zero when the node does not exist)
    /// @return active whether the node is active
    function signerAndStatus(uint256 nodeId) external view returns (address signer, bool active) {
        Node storage n = _nodes[nodeId];
        return (n.signer, n.active);
    }

    /// @notice How many nodes were registered; ids run from 1 to this number.
    /// @return the count
    function nodeCount() external view returns (uint256) {
        return _count;
    }
}
