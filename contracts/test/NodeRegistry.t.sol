// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./utils/Test.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";

contract NodeRegistryTest is Test {
    NodeRegistry internal reg;
    address internal op;
    address internal other;
    address internal s1;
    address internal s2;

    function setUp() public {
        reg = new NodeRegistry();
        op = makeAddr("op");
        other = makeAddr("other");
        s1 = makeAddr("s1");
        s2 = makeAddr("s2");
        vm.warp(5_000);
    }

    function _register() internal returns (uint256 id) {
        vm.prank(op);
        id = reg.registerNode(s1, "https://n1", "smollm2");
    }

    function test_registerNode_storesAndEmits() public {
        vm.expectEmit(address(reg));
        emit NodeRegistry.NodeRegistered(1, op, s1, "https://n1", "smollm2");
        uint256 id = _register();
        assertEq(id, 1);
        NodeRegistry.Node memory n = reg.getNode(1);
        assertEq(n.operator, op);
        assertEq(n.signer, s1);
        assertTrue(n.active);
        assertEq(n.endpoint, "https://n1");
        assertEq(n.baseModel, "smollm2");
        assertEq(n.registeredAt, 5_000);
        assertEq(reg.signerOf(1), s1);
        assertEq(reg.operatorOf(1), op);
        assertTrue(reg.isActive(1));
        (address s, bool active) = reg.signerAndStatus(1);
        assertEq(s, s1);
        assertTrue(active);
        assertEq(reg.nodeCount(), 1);
        vm.prank(other);
        assertEq(reg.registerNode(s2, "https://n2", "smollm2"), 2);
    }

    function test_registerNode_revertsOnZeroSigner() public {
        vm.expectRevert(NodeRegistry.ZeroAddress.selector);
        reg.registerNode(address(0), "e", "m");
    }

    function test_registerNode_revertsOnEmptyEndpoint() public {
        vm.expectRevert(NodeRegistry.EmptyString.selector);
        reg.registerNode(s1, "", "m");
    }

    function test_registerNode_revertsOnEmptyBaseModel() public {
        vm.expectRevert(NodeRegistry.EmptyString.selector);
        reg.registerNode(s1, "e", "");
    }

    function test_rotateSigner_replacesAndEmits() public {
        _register();
        vm.expectEmit(address(reg));
        emit NodeRegistry.SignerRotated(1, s1, s2);
        vm.prank(op);
        reg.rotateSigner(1, s2);
        assertEq(reg.signerOf(1), s2);
    }

    function test_rotateSigner_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnknownNode.selector, 1));
        reg.rotateSigner(1, s2);
        _register();
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotNodeOperator.selector, 1, s1));
        vm.prank(s1); // the signer is not the operator
        reg.rotateSigner(1, s2);
        vm.startPrank(op);
        vm.expectRevert(NodeRegistry.ZeroAddress.selector);
        reg.rotateSigner(1, address(0));
        vm.expectRevert(NodeRegistry.SameSigner.selector);
        reg.rotateSigner(1, s1);
        reg.deactivateNode(1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NodeInactive.selector, 1));
        reg.rotateSigner(1, s2);
        vm.stopPrank();
    }

    function test_updateEndpoint_replacesAndEmits() public {
        _register();
        vm.expectEmit(address(reg));
        emit NodeRegistry.EndpointUpdated(1, "https://n1b");
        vm.prank(op);
        reg.updateEndpoint(1, "https://n1b");
        assertEq(reg.getNode(1).endpoint, "https://n1b");
    }

    function test_updateEndpoint_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnknownNode.selector, 1));
        reg.updateEndpoint(1, "x");
        _register();
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotNodeOperator.selector, 1, other));
        vm.prank(other);
        reg.updateEndpoint(1, "x");
        vm.startPrank(op);
        vm.expectRevert(NodeRegistry.EmptyString.selector);
        reg.updateEndpoint(1, "");
        reg.deactivateNode(1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NodeInactive.selector, 1));
        reg.updateEndpoint(1, "x");
        vm.stopPrank();
    }

    function test_deactivateNode_flagsAndEmits() public {
        _register();
        vm.expectEmit(address(reg));
        emit NodeRegistry.NodeDeactivated(1);
        vm.prank(op);
        reg.deactivateNode(1);
        assertFalse(reg.isActive(1));
        (address s, bool active) = reg.signerAndStatus(1);
        assertEq(s, s1); // the signer stays readable
        assertFalse(active);
    }

    function test_deactivateNode_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnknownNode.selector, 1));
        reg.deactivateNode(1);
        _register();
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NotNodeOperator.selector, 1, other));
        vm.prank(other);
        reg.deactivateNode(1);
        vm.startPrank(op);
        reg.deactivateNode(1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.NodeInactive.selector, 1));
        reg.deactivateNode(1);
        vm.stopPrank();
    }

    function test_reads_revertForUnknown() public {
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnknownNode.selector, 3));
        reg.getNode(3);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnknownNode.selector, 3));
        reg.signerOf(3);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnknownNode.selector, 3));
        reg.operatorOf(3);
        assertFalse(reg.isActive(3));
        (address s, bool active) = reg.signerAndStatus(3);
        assertEq(s, address(0));
        assertFalse(active);
        assertEq(reg.nodeCount(), 0);
    }

    function testFuzz_rotateSigner_anyNewSigner(address next) public {
        vm.assume(next != address(0) && next != s1);
        _register();
        vm.prank(op);
        reg.rotateSigner(1, next);
        assertEq(reg.signerOf(1), next);
    }
}
