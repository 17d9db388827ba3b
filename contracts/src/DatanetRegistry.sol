// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title DatanetRegistry
/// @notice Registry of Datanets: curated data sets whose contributors share in the revenue of the
///         adapters trained on them. A Datanet has an owner, a metadata URI (contributors, licence,
///         description) and a content hash of that metadata. Ids start at 1; 0 means "no Datanet".
/// @dev Ownership is per Datanet; there is no registry administrator.
contract DatanetRegistry {
    /// @notice One Datanet as stored.
    struct Datanet {
        address owner;
        uint64 createdAt;
        uint64 updatedAt;
        bytes32 contentHash;
        string metadataURI;
    }

    /// @notice The Datanet `datanetId` does not exist.
    error UnknownDatanet(uint256 datanetId);
    /// @notice `caller` is not the owner of Datanet `datanetId`.
    error NotDatanetOwner(uint256 datanetId, address caller);
    /// @notice An owner cannot be the zero address.
    error ZeroAddress();
    /// @notice The metadata URI must not be empty.
    error EmptyURI();

    /// @notice A Datanet was created.
    event DatanetCreated(uint256 indexed datanetId, address indexed owner, string metadataURI, bytes32 contentHash);
    /// @notice A Datanet's metadata URI and content hash changed.
    event DatanetMetadataUpdated(uint256 indexed datanetId, string metadataURI, bytes32 contentHash);
    /// @notice A Datanet changed owner.
    event DatanetTransferred(uint256 indexed datanetId, address indexed from, address indexed to);

    uint256 private _count;
    mapping(uint256 datanetId => Datanet) private _datanets;

    modifier onlyDatanetOwner(uint256 datanetId) {
        address owner = _datanets[datanetId].owner;
        if (owner == address(0)) revert UnknownDatanet(datanetId);
        if (owner != msg.sender) revert NotDatanetOwner(datanetId, msg.sender);
        _;
    }

    /// @notice Creates a Datanet owned by the caller.
    /// @param metadataURI where the Datanet's metadata lives (non-empty)
    /// @param contentHash hash of that metadata (for example its sha256)
    /// @return datanetId the new Datanet's id (1, 2, ...)
    function createDatanet(string calldata metadataURI, bytes32 contentHash) external returns (uint256 datanetId) {
        if (bytes(metadataURI).length == 0) revert EmptyURI();
        datanetId = ++_count;
        _datanets[datanetId] = Datanet({
            owner: msg.sender,
            createdAt: uint64(block.timestamp),
            updatedAt: uint64(block.timestamp),
            contentHash: contentHash,
            metadataURI: metadataURI
        });
        emit DatanetCreated(datanetId, msg.sender, metadataURI, contentHash);
    }

    /// @notice Replaces a Datanet's metadata URI and content hash; owner only.
    /// @param datanetId the Datanet
    /// @param metadataURI the new URI (non-empty)
    /// @param contentHash the new content hash
    function updateMetadata(uint256 datanetId, string calldata metadataURI, bytes32 contentHash)
        external
        onlyDatanetOwner(datanetId)
    {
        if (bytes(metadataURI).length == 0) revert EmptyURI();
        Datanet storage d = _datanets[datanetId];
        d.metadataURI = metadataURI;
        d.contentHash = contentHash;
        d.updatedAt = uint64(block.timestamp);
        emit DatanetMetadataUpdated(datanetId, metadataURI, contentHash);
    }

    /// @notice Hands a Datanet to a new owner; owner only.
    /// @param datanetId the Datanet
    /// @param newOwner the new owner (not the zero address)
    function transferDatanet(uint256 datanetId, address newOwner) external onlyDatanetOwner(datanetId) {
        if (newOwner == address(0)) revert ZeroAddress();
        Datanet storage d = _datanets[datanetId];
        d.owner = newOwner;
        d.updatedAt = uint64(block.timestamp);
        emit DatanetTransferred(datanetId, msg.sender, newOwner);
    }

    /// @notice Reads one Datanet; reverts with UnknownDatanet when it does not exist.
    /// @param datanetId the Datanet
    /// @return the stored Datanet
    function getDatanet(uint256 datanetId) external view returns (Datanet memory) {
        Datanet memory d = _datanets[datanetId];
        if (d.owner == address(0)) revert UnknownDatanet(datanetId);
        return d;
    }

    /// @notice The owner of a Datanet; reverts with UnknownDatanet when it does not exist.
    /// @param datanetId the Datanet
    /// @return the owner's address
    function ownerOf(uint256 datanetId) external view returns (address) {
        address owner = _datanets[datanetId].owner;
        if (owner == address(0)) revert UnknownDatanet(datanetId);
        return owner;
    }

    /// @notice Whether a Datanet with this id exists.
    /// @param datanetId the id to check
    /// @return true when it exists
    function exists(uint256 datanetId) external view returns (bool) {
        return _datanets[datanetId].owner != address(0);
    }

    /// @notice How many Datanets were created; ids run from 1 to this number.
    /// @return the count
    function datanetCount() external view returns (uint256) {
        return _count;
    }
}
