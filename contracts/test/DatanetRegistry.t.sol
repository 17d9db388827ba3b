// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./utils/Test.sol";
import {DatanetRegistry} from "../src/DatanetRegistry.sol";

contract DatanetRegistryTest is Test {
    DatanetRegistry internal reg;
    address internal alice;
    address internal bob;

    function setUp() public {
        reg = new DatanetRegistry();
        alice = makeAddr("alice");
        bob = makeAddr("bob");
        vm.warp(1_000);
    }

    function _create(address who, string memory uri, bytes32 h) internal returns (uint256 id) {
        vm.prank(who);
        id = reg.createDatanet(uri, h);
    }

    function test_createDatanet_storesAndEmits() public {
        vm.expectEmit(address(reg));
        emit DatanetRegistry.DatanetCreated(1, alice, "ipfs://a", bytes32("h"));
        uint256 id = _create(alice, "ipfs://a", bytes32("h"));
        assertEq(id, 1);
        DatanetRegistry.Datanet memory d = reg.getDatanet(1);
        assertEq(d.owner, alice);
        assertEq(d.metadataURI, "ipfs://a");
        assertEq(d.contentHash, bytes32("h"));
        assertEq(d.createdAt, 1_000);
        assertEq(d.updatedAt, 1_000);
        assertEq(reg.datanetCount(), 1);
        assertEq(reg.ownerOf(1), alice);
        assertTrue(reg.exists(1));
    }

    function test_createDatanet_idsAreSequential() public {
        assertEq(_create(alice, "a", 0), 1);
        assertEq(_create(bob, "b", 0), 2);
        assertEq(_create(alice, "c", 0), 3);
        assertEq(reg.datanetCount(), 3);
        assertEq(reg.ownerOf(2), bob);
    }

    function test_createDatanet_revertsOnEmptyURI() public {
        vm.expectRevert(DatanetRegistry.EmptyURI.selector);
        _create(alice, "", bytes32("h"));
    }

    function test_updateMetadata_replacesAndEmits() public {
        _create(alice, "a", bytes32("1"));
        vm.warp(2_000);
        vm.expectEmit(address(reg));
        emit DatanetRegistry.DatanetMetadataUpdated(1, "b", bytes32("2"));
        vm.prank(alice);
        reg.updateMetadata(1, "b", bytes32("2"));
        DatanetRegistry.Datanet memory d = reg.getDatanet(1);
        assertEq(d.metadataURI, "b");
        assertEq(d.contentHash, bytes32("2"));
        assertEq(d.createdAt, 1_000);
        assertEq(d.updatedAt, 2_000);
    }

    function test_updateMetadata_revertsForUnknown() public {
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.UnknownDatanet.selector, 7));
        vm.prank(alice);
        reg.updateMetadata(7, "b", 0);
    }

    function test_updateMetadata_revertsForNonOwner() public {
        _create(alice, "a", 0);
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.NotDatanetOwner.selector, 1, bob));
        vm.prank(bob);
        reg.updateMetadata(1, "b", 0);
    }

    function test_updateMetadata_revertsOnEmptyURI() public {
        _create(alice, "a", 0);
        vm.expectRevert(DatanetRegistry.EmptyURI.selector);
        vm.prank(alice);
        reg.updateMetadata(1, "", 0);
    }

    function test_transferDatanet_movesOwnership() public {
        _create(alice, "a", 0);
        vm.expectEmit(address(reg));
        emit DatanetRegistry.DatanetTransferred(1, alice, bob);
        vm.prank(alice);
        reg.transferDatanet(1, bob);
        assertEq(reg.ownerOf(1), bob);
        // the old owner lost control, the new one has it
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.NotDatanetOwner.selector, 1, alice));
        vm.prank(alice);
        reg.updateMetadata(1, "x", 0);
        vm.prank(bob);
        reg.updateMetadata(1, "x", 0);
    }

    function test_transferDatanet_revertsForUnknown() public {
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.UnknownDatanet.selector, 1));
        vm.prank(alice);
        reg.transferDatanet(1, bob);
    }

    function test_transferDatanet_revertsForNonOwner() public {
        _create(alice, "a", 0);
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.NotDatanetOwner.selector, 1, bob));
        vm.prank(bob);
        reg.transferDatanet(1, bob);
    }

    function test_transferDatanet_revertsToZero() public {
        _create(alice, "a", 0);
        vm.expectRevert(DatanetRegistry.ZeroAddress.selector);
        vm.prank(alice);
        reg.transferDatanet(1, address(0));
    }

    function test_reads_revertForUnknown() public {
        assertFalse(reg.exists(0));
        assertFalse(reg.exists(1));
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.UnknownDatanet.selector, 0));
        reg.getDatanet(0);
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.UnknownDatanet.selector, 1));
        reg.ownerOf(1);
    }

    function testFuzz_createDatanet_roundTrips(address who, string calldata uri, bytes32 h) public {
        vm.assume(who != address(0) && bytes(uri).length > 0);
        uint256 id = _create(who, uri, h);
        DatanetRegistry.Datanet memory d = reg.getDatanet(id);
        assertEq(d.owner, who);
        assertEq(d.metadataURI, uri);
        assertEq(d.contentHash, h);
    }
}
