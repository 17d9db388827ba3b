// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

// A minimal stand-in for forge-std's Test (forge-std is not installable here: the npm "forge-std"
// package is an old unofficial copy whose Test.sol imports a ds-test it does not ship). forge serves
// the cheatcodes at the fixed address below whatever library declares them; this file declares only
// the ones the suite uses, plus assertions (forge's own assert cheatcodes, so failures carry forge's
// messages), `bound`, named addresses, and the invariant-target hooks forge reads from a test contract.

/// @dev Cheatcodes served by forge at address(uint160(uint256(keccak256("hevm cheat code")))).
interface Vm {
    // environment
    function warp(uint256 newTimestamp) external;
    function roll(uint256 newHeight) external;
    function chainId(uint256 newChainId) external;
    function deal(address account, uint256 newBalance) external;
    function label(address account, string calldata newLabel) external;
    function etch(address target, bytes calldata newRuntimeBytecode) external;
    function load(address target, bytes32 slot) external view returns (bytes32 data);
    function snapshotState() external returns (uint256 snapshotId);
    function revertToState(uint256 snapshotId) external returns (bool success);
    // callers
    function prank(address msgSender) external;
    function startPrank(address msgSender) external;
    function stopPrank() external;
    // expectations
    function expectRevert() external;
    function expectRevert(bytes4 revertData) external;
    function expectRevert(bytes calldata revertData) external;
    function expectEmit() external;
    function expectEmit(address emitter) external;
    function expectEmit(bool checkTopic1, bool checkTopic2, bool checkTopic3, bool checkData) external;
    function expectEmit(bool checkTopic1, bool checkTopic2, bool checkTopic3, bool checkData, address emitter)
        external;
    function recordLogs() external;
    // keys and signatures
    function addr(uint256 privateKey) external pure returns (address keyAddr);
    function sign(uint256 privateKey, bytes32 digest) external pure returns (uint8 v, bytes32 r, bytes32 s);
    // fuzzing
    function assume(bool condition) external pure;
    // assertions (revert with a formatted message on failure)
    function assertTrue(bool condition, string calldata error) external pure;
    function assertFalse(bool condition, string calldata error) external pure;
    function assertEq(bool left, bool right, string calldata error) external pure;
    function assertEq(uint256 left, uint256 right, string calldata error) external pure;
    function assertEq(int256 left, int256 right, string calldata error) external pure;
    function assertEq(address left, address right, string calldata error) external pure;
    function assertEq(bytes32 left, bytes32 right, string calldata error) external pure;
    function assertEq(string calldata left, string calldata right, string calldata error) external pure;
    function assertEq(bytes calldata left, bytes calldata right, string calldata error) external pure;
    function assertEq(uint256[] calldata left, uint256[] calldata right, string calldata error) external pure;
    function assertNotEq(uint256 left, uint256 right, string calldata error) external pure;
    function assertNotEq(address left, address right, string calldata error) external pure;
    function assertNotEq(bytes32 left, bytes32 right, string calldata error) external pure;
    function assertLt(uint256 left, uint256 right, string calldata error) external pure;
    function assertLe(uint256 left, uint256 right, string calldata error) external pure;
    function assertGt(uint256 left, uint256 right, string calldata error) external pure;
    function assertGe(uint256 left, uint256 right, string calldata error) external pure;
}

/// @dev Cheatcodes, assertions and helpers, for tests and for invariant handlers alike.
abstract contract TestBase {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    /// @dev forge prints these (ds-test's log events) under "Logs:" with -vv.
    event log_named_uint(string key, uint256 val);

    // ---------------------------------------------------------------- assertions

    function assertTrue(bool c) internal pure {
        vm.assertTrue(c, "");
    }

    function assertTrue(bool c, string memory err) internal pure {
        vm.assertTrue(c, err);
    }

    function assertFalse(bool c) internal pure {
        vm.assertFalse(c, "");
    }

    function assertFalse(bool c, string memory err) internal pure {
        vm.assertFalse(c, err);
    }

    function assertEq(bool a, bool b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertEq(uint256 a, uint256 b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertEq(uint256 a, uint256 b, string memory err) internal pure {
        vm.assertEq(a, b, err);
    }

    function assertEq(address a, address b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertEq(address a, address b, string memory err) internal pure {
        vm.assertEq(a, b, err);
    }

    function assertEq(bytes32 a, bytes32 b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertEq(bytes32 a, bytes32 b, string memory err) internal pure {
        vm.assertEq(a, b, err);
    }

    function assertEq(string memory a, string memory b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertEq(bytes memory a, bytes memory b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertEq(uint256[] memory a, uint256[] memory b) internal pure {
        vm.assertEq(a, b, "");
    }

    function assertNotEq(address a, address b) internal pure {
        vm.assertNotEq(a, b, "");
    }

    function assertNotEq(bytes32 a, bytes32 b) internal pure {
        vm.assertNotEq(a, b, "");
    }

    function assertLt(uint256 a, uint256 b) internal pure {
        vm.assertLt(a, b, "");
    }

    function assertLe(uint256 a, uint256 b) internal pure {
        vm.assertLe(a, b, "");
    }

    function assertLe(uint256 a, uint256 b, string memory err) internal pure {
        vm.assertLe(a, b, err);
    }

    function assertGt(uint256 a, uint256 b) internal pure {
        vm.assertGt(a, b, "");
    }

    function assertGe(uint256 a, uint256 b) internal pure {
        vm.assertGe(a, b, "");
    }

    function assertGe(uint256 a, uint256 b, string memory err) internal pure {
        vm.assertGe(a, b, err);
    }

    // ---------------------------------------------------------------- helpers

    /// @dev Maps any `x` into [lo, hi] (inclusive) keeping small values small, as forge-std's bound.
    function bound(uint256 x, uint256 lo, uint256 hi) internal pure returns (uint256) {
        require(lo <= hi, "bound: lo > hi");
        if (x >= lo && x <= hi) return x;
        uint256 size = hi - lo + 1;
        if (size == 0) return x; // the full uint256 range
        return lo + (x % size);
    }

    /// @dev A labelled address derived from a name, with its private key.
    function makeAddrAndKey(string memory name) internal returns (address who, uint256 key) {
        key = uint256(keccak256(abi.encodePacked(name)));
        who = vm.addr(key);
        vm.label(who, name);
    }

    /// @dev A labelled address derived from a name.
    function makeAddr(string memory name) internal returns (address who) {
        (who,) = makeAddrAndKey(name);
    }

    /// @dev `vm.sign` packed as the 65-byte r ‖ s ‖ v signature OpenZeppelin's ECDSA takes.
    function signDigest(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }
}

/// @dev A test contract (forge runs its test*, testFuzz* and invariant* functions).
abstract contract Test is TestBase {
    /// @dev forge's marker of a test contract.
    bool public IS_TEST = true;
}

/// @dev The hooks forge reads from an invariant test contract to pick what the fuzzer calls.
abstract contract InvariantTest is Test {
    struct FuzzSelector {
        address addr;
        bytes4[] selectors;
    }

    address[] private _targetContracts;
    FuzzSelector[] private _targetSelectors;
    address[] private _excludeSenders;

    function targetContract(address target) internal {
        _targetContracts.push(target);
    }

    function targetSelector(FuzzSelector memory sel) internal {
        _targetSelectors.push(sel);
    }

    function excludeSender(address who) internal {
        _excludeSenders.push(who);
    }

    function targetContracts() public view returns (address[] memory) {
        return _targetContracts;
    }

    function targetSelectors() public view returns (FuzzSelector[] memory) {
        return _targetSelectors;
    }

    function excludeSenders() public view returns (address[] memory) {
        return _excludeSenders;
    }
}
