// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DatanetRegistry} from "./DatanetRegistry.sol";

/// @title AdapterRegistry
/// @notice Registry of LoRA adapters: who owns an adapter, which base model it applies to, where its
///         weights live (URI + sha256 content hash), which Datanet it was trained on, what it costs per
///         million input and output tokens, and how its revenue is split between the adapter owner, the
///         Datanet's contributors and the serving node's operator (basis points summing to 10000).
///         Content and price updates bump the adapter's version. Ids start at 1.
contract AdapterRegistry {
    uint16 public constant BPS = 10_000;

    /// @notice One adapter as stored.
    struct Adapter {
        address owner;
        uint32 version;
        bool active;
        uint16 ownerBps;
        uint16 contributorsBps;
        uint16 operatorBps;
        uint128 pricePerMInput;
        uint128 pricePerMOutput;
        uint256 datanetId;
        bytes32 contentHash;
        uint64 createdAt;
        uint64 updatedAt;
        string name;
        string baseModel;
        string uri;
    }

    /// @notice What `registerAdapter` takes.
    struct AdapterParams {
        string name;
        string baseModel;
        bytes32 contentHash;
        string uri;
        uint256 datanetId;
        uint128 pricePerMInput;
        uint128 pricePerMOutput;
        uint16 ownerBps;
        uint16 contributorsBps;
        uint16 operatorBps;
    }

    /// @notice The adapter `adapterId` does not exist.
    error UnknownAdapter(uint256 adapterId);
    /// @notice `caller` is not the owner of adapter `adapterId`.
    error NotAdapterOwner(uint256 adapterId, address caller);
    /// @notice The adapter `adapterId` was deactivated.
    error AdapterInactive(uint256 adapterId);
    /// @notice The Datanet `datanetId` does not exist.
    error UnknownDatanet(uint256 datanetId);
    /// @notice The three shares do not sum to 10000 basis points.
    error BadSplit(uint16 ownerBps, uint16 contributorsBps, uint16 operatorBps);
    /// @notice A contributors' share needs a Datanet whose contributors receive it.
    error ContributorsWithoutDatanet();
    /// @notice A required string argument was empty.
    error EmptyString();
    /// @notice The content hash must not be zero.
    error ZeroContentHash();
    /// @notice An owner cannot be the zero address.
    error ZeroAddress();

    /// @notice An adapter was registered (its content and price at version 1 follow as events).
    event AdapterRegistered(
        uint256 indexed adapterId,
        address indexed owner,
        uint256 indexed datanetId,
        string name,
        string baseModel,
        uint16 ownerBps,
        uint16 contributorsBps,
        uint16 operatorBps
    );
    /// @notice The adapter's weights URI and content hash as of `version`.
    event AdapterContentUpdated(uint256 indexed adapterId, uint32 version, string uri, bytes32 contentHash);
    /// @notice The adapter's prices as of `version`.
    event AdapterPriceUpdated(uint256 indexed adapterId, uint32 version, uint128 pricePerMInput, uint128 pricePerMOutput);
    /// @notice The adapter was deactivated for good.
    event AdapterDeactivated(uint256 indexed adapterId);
    /// @notice The adapter changed owner.
    event AdapterTransferred(uint256 indexed adapterId, address indexed from, address indexed to);

    /// @notice The Datanet registry adapters refer to.
    DatanetRegistry public immutable datanets;

    uint256 private _count;
    mapping(uint256 adapterId => Adapter) private _adapters;
    mapping(bytes32 baseModelHash => uint256[]) private _byBaseModel;

    /// @param datanetRegistry the Datanet registry that `datanetId`s refer to
    constructor(DatanetRegistry datanetRegistry) {
        if (address(datanetRegistry) == address(0)) revert ZeroAddress();
        datanets = datanetRegistry;
    }

    modifier onlyActiveOwner(uint256 adapterId) {
        Adapter storage a = _adapters[adapterId];
        if (a.owner == address(0)) revert UnknownAdapter(adapterId);
        if (a.owner != msg.sender) revert NotAdapterOwner(adapterId, msg.sender);
        if (!a.active) revert AdapterInactive(adapterId);
        _;
    }

    /// @notice Registers an adapter owned by the caller, at version 1.
    /// @param p name, base model, sha256 content hash, URI, Datanet id (0 = none), prices per million
    ///        input/output tokens, and the revenue split (sums to 10000; contributors' share needs a Datanet)
    /// @return adapterId the new adapter's id (1, 2, ...)
    function registerAdapter(AdapterParams calldata p) external returns (uint256 adapterId) {
        if (bytes(p.name).length == 0 || bytes(p.baseModel).length == 0 || bytes(p.uri).length == 0) {
            revert EmptyString();
        }
        if (p.contentHash == bytes32(0)) revert ZeroContentHash();
        if (uint256(p.ownerBps) + p.contributorsBps + p.operatorBps != BPS) {
            revert BadSplit(p.ownerBps, p.contributorsBps, p.operatorBps);
        }
        if (p.datanetId == 0) {
            if (p.contributorsBps != 0) revert ContributorsWithoutDatanet();
        } else if (!datanets.exists(p.datanetId)) {
            revert UnknownDatanet(p.datanetId);
        }

        adapterId = ++_count;
        Adapter storage a = _adapters[adapterId];
        a.owner = msg.sender;
        a.version = 1;
        a.active = true;
        a.ownerBps = p.ownerBps;
        a.contributorsBps = p.contributorsBps;
        a.operatorBps = p.operatorBps;
        a.pricePerMInput = p.pricePerMInput;
        a.pricePerMOutput = p.pricePerMOutput;
        a.datanetId = p.datanetId;
        a.contentHash = p.contentHash;
        a.createdAt = uint64(block.timestamp);
        a.updatedAt = uint64(block.timestamp);
        a.name = p.name;
        a.baseModel = p.baseModel;
        a.uri = p.uri;
        _byBaseModel[keccak256(bytes(p.baseModel))].push(adapterId);

        emit AdapterRegistered(
            adapterId, msg.sender, p.datanetId, p.name, p.baseModel, p.ownerBps, p.contributorsBps, p.operatorBps
        );
        emit AdapterContentUpdated(adapterId, 1, p.uri, p.contentHash);
        emit AdapterPriceUpdated(adapterId, 1, p.pricePerMInput, p.pricePerMOutput);
    }

    /// @notice Points the adapter at new weights; bumps the version. Owner only, active adapters only.
    /// @param adapterId the adapter
    /// @param uri the new weights URI (non-empty)
    /// @param contentHash the new sha256 content hash (non-zero)
    /// @return version the new version
    function updateContent(uint256 adapterId, string calldata uri, bytes32 contentHash)
        external
        onlyActiveOwner(adapterId)
        returns (uint32 version)
    {
        if (bytes(uri).length == 0) revert EmptyString();
        if (contentHash == bytes32(0)) revert ZeroContentHash();
        Adapter storage a = _adapters[adapterId];
        version = ++a.version;
        a.uri = uri;
        a.contentHash = contentHash;
        a.updatedAt = uint64(block.timestamp);
        emit AdapterContentUpdated(adapterId, version, uri, contentHash);
    }

    /// @notice Sets new prices; bumps the version. Owner only, active adapters only.
    /// @param adapterId the adapter
    /// @param pricePerMInput base units per million input tokens
    /// @param pricePerMOutput base units per million output tokens
    /// @return version the new version
    function updatePrice(uint256 adapterId, uint128 pricePerMInput, uint128 pricePerMOutput)
        external
        onlyActiveOwner(adapterId)
        returns (uint32 version)
    {
        Adapter storage a = _adapters[adapterId];
        version = ++a.version;
        a.pricePerMInput = pricePerMInput;
        a.pricePerMOutput = pricePerMOutput;
        a.updatedAt = uint64(block.timestamp);
        emit AdapterPriceUpdated(adapterId, version, pricePerMInput, pricePerMOutput);
    }

    /// @notice Deactivates the adapter for good (nodes stop serving it). Owner only.
    /// @param adapterId the adapter
    function deactivateAdapter(uint256 adapterId) external onlyActiveOwner(adapterId) {
        Adapter storage a = _adapters[adapterId];
        a.active = false;
        a.updatedAt = uint64(block.timestamp);
        emit AdapterDeactivated(adapterId);
    }

    /// @notice Hands the adapter (and its owner share of future revenue) to a new owner. Owner only.
    /// @param adapterId the adapter
    /// @param newOwner the new owner (not the zero address)
    function transferAdapter(uint256 adapterId, address newOwner) external onlyActiveOwner(adapterId) {
        if (newOwner == address(0)) revert ZeroAddress();
        Adapter storage a = _adapters[adapterId];
        a.owner = newOwner;
        a.updatedAt = uint64(block.timestamp);
        emit AdapterTransferred(adapterId, msg.sender, newOwner);
    }

    /// @notice Reads one adapter; reverts with UnknownAdapter when it does not exist.
    /// @param adapterId the adapter
    /// @return the stored adapter
    function getAdapter(uint256 adapterId) external view returns (Adapter memory) {
        Adapter memory a = _adapters[adapterId];
        if (a.owner == address(0)) revert UnknownAdapter(adapterId);
        return a;
    }

    /// @notice Reads up to `maxCount` adapters with ids `fromId`, `fromId + 1`, ... (for sync).
    /// @param fromId the first id (at least 1)
    /// @param maxCount the most adapters to return
    /// @return page the adapters, fewer than `maxCount` at the end of the registry
    function getAdapters(uint256 fromId, uint256 maxCount) external view returns (Adapter[] memory page) {
        if (fromId == 0) fromId = 1;
        uint256 n = fromId > _count ? 0 : _count - fromId + 1;
        if (n > maxCount) n = maxCount;
        page = new Adapter[](n);
        for (uint256 i = 0; i < n; ++i) {
            page[i] = _adapters[fromId + i];
        }
    }

    /// @notice Ids of every adapter ever registered for a base model (active or not), in id order.
    /// @param baseModel the base model id, e.g. "smollm2-135m-instruct"
    /// @return the adapter ids
    function adaptersByBaseModel(string calldata baseModel) external view returns (uint256[] memory) {
        return _byBaseModel[keccak256(bytes(baseModel))];
    }

    /// @notice Cost of a request on this adapter at its current prices:
    ///         ceil((inputTokens * pricePerMInput + outputTokens * pricePerMOutput) / 1e6).
    /// @param adapterId the adapter
    /// @param inputTokens prompt tokens
    /// @param outputTokens generated tokens
    /// @return cost in token base units
    function quote(uint256 adapterId, uint64 inputTokens, uint64 outputTokens) external view returns (uint256 cost) {
        Adapter storage a = _adapters[adapterId];
        if (a.owner == address(0)) revert UnknownAdapter(adapterId);
        uint256 micros = uint256(inputTokens) * a.pricePerMInput + uint256(outputTokens) * a.pricePerMOutput;
        return (micros + 999_999) / 1_000_000;
    }

    /// @notice The owner of an adapter; reverts with UnknownAdapter when it does not exist.
    /// @param adapterId the adapter
    /// @return the owner's address
    function ownerOf(uint256 adapterId) external view returns (address) {
        address owner = _adapters[adapterId].owner;
        if (owner == address(0)) revert UnknownAdapter(adapterId);
        return owner;
    }

    /// @notice How many adapters were registered; ids run from 1 to this number.
    /// @return the count
    function adapterCount() external view returns (uint256) {
        return _count;
    }
}
