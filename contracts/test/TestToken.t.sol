// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./utils/Test.sol";
import {TestToken} from "../src/TestToken.sol";

contract TestTokenTest is Test {
    function test_metadataAndMint() public {
        TestToken t = new TestToken("Test USD", "tUSD", 6);
        assertEq(t.name(), "Test USD");
        assertEq(t.symbol(), "tUSD");
        assertEq(uint256(t.decimals()), 6);
        address bob = makeAddr("bob");
        vm.prank(bob); // anyone may mint
        t.mint(bob, 123);
        assertEq(t.balanceOf(bob), 123);
        assertEq(t.totalSupply(), 123);
    }

    function test_deploysOnChain1337() public {
        vm.chainId(1337);
        TestToken t = new TestToken("T", "T", 18);
        assertEq(uint256(t.decimals()), 18);
    }

    function test_refusesPublicChains() public {
        vm.chainId(1);
        vm.expectRevert(abi.encodeWithSelector(TestToken.NotALocalChain.selector, 1));
        new TestToken("T", "T", 18);
        vm.chainId(8453);
        vm.expectRevert(abi.encodeWithSelector(TestToken.NotALocalChain.selector, 8453));
        new TestToken("T", "T", 18);
    }

    function testFuzz_mint(address to, uint128 a, uint128 b) public {
        vm.assume(to != address(0));
        TestToken t = new TestToken("T", "T", 6);
        t.mint(to, a);
        t.mint(to, b);
        assertEq(t.balanceOf(to), uint256(a) + b);
    }
}
