// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./utils/Test.sol";
import {DatanetRegistry} from "../src/DatanetRegistry.sol";
import {AdapterRegistry} from "../src/AdapterRegistry.sol";

contract AdapterRegistryTest is Test {
    DatanetRegistry internal datanets;
    AdapterRegistry internal reg;
    address internal alice;
    address internal bob;
    uint256 internal datanetId;

    function setUp() public {
        datanets = new DatanetRegistry();
        reg = new AdapterRegistry(datanets);
        alice = makeAddr("alice");
        bob = makeAddr("bob");
        vm.warp(10_000);
        vm.prank(bob);
        datanetId = datanets.createDatanet("ipfs://datanet", bytes32("meta"));
    }

    function _params() internal view returns (AdapterRegistry.AdapterParams memory p) {
        p = AdapterRegistry.AdapterParams({
            name: "sql-helper",
            baseModel: "smollm2-135m-instruct",
            contentHash: sha256("weights"),
            uri: "file:///adapters/sql-helper",
            datanetId: datanetId,
            pricePerMInput: 1_000_000,
            pricePerMOutput: 3_000_000,
            ownerBps: 6_000,
            contributorsBps: 3_000,
            operatorBps: 1_000
        });
    }

    function _register(AdapterRegistry.AdapterParams memory p) internal returns (uint256 id) {
        vm.prank(alice);
        id = reg.registerAdapter(p);
    }

    function _expectRegisterRevert(AdapterRegistry.AdapterParams memory p, bytes memory err) internal {
        vm.expectRevert(err);
        vm.prank(alice);
        reg.registerAdapter(p);
    }

    function test_constructor_revertsOnZeroDatanetRegistry() public {
        vm.expectRevert(AdapterRegistry.ZeroAddress.selector);
        new AdapterRegistry(DatanetRegistry(address(0)));
    }

    function test_registerAdapter_storesAndEmits() public {
        AdapterRegistry.AdapterParams memory p = _params();
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterRegistered(
            1, alice, datanetId, "sql-helper", "smollm2-135m-instruct", 6_000, 3_000, 1_000
        );
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterContentUpdated(1, 1, p.uri, p.contentHash);
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterPriceUpdated(1, 1, 1_000_000, 3_000_000);
        uint256 id = _register(p);
        assertEq(id, 1);
        AdapterRegistry.Adapter memory a = reg.getAdapter(1);
        assertEq(a.owner, alice);
        assertEq(a.version, 1);
        assertTrue(a.active);
        assertEq(a.name, p.name);
        assertEq(a.baseModel, p.baseModel);
        assertEq(a.contentHash, p.contentHash);
        assertEq(a.uri, p.uri);
        assertEq(a.datanetId, datanetId);
        assertEq(a.pricePerMInput, 1_000_000);
        assertEq(a.pricePerMOutput, 3_000_000);
        assertEq(a.ownerBps, 6_000);
        assertEq(a.contributorsBps, 3_000);
        assertEq(a.operatorBps, 1_000);
        assertEq(a.createdAt, 10_000);
        assertEq(reg.adapterCount(), 1);
        assertEq(reg.ownerOf(1), alice);
    }

    function test_registerAdapter_withoutDatanet() public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.datanetId = 0;
        p.contributorsBps = 0;
        p.ownerBps = 9_000;
        uint256 id = _register(p);
        assertEq(reg.getAdapter(id).datanetId, 0);
    }

    function test_registerAdapter_revertsOnEmptyStrings() public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.name = "";
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.EmptyString.selector));
        p = _params();
        p.baseModel = "";
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.EmptyString.selector));
        p = _params();
        p.uri = "";
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.EmptyString.selector));
    }

    function test_registerAdapter_revertsOnZeroHash() public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.contentHash = 0;
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.ZeroContentHash.selector));
    }

    function test_registerAdapter_revertsOnBadSplit() public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.operatorBps = 999;
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.BadSplit.selector, 6_000, 3_000, 999));
        p.operatorBps = 1_001;
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.BadSplit.selector, 6_000, 3_000, 1_001));
    }

    function test_registerAdapter_revertsOnContributorsWithoutDatanet() public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.datanetId = 0;
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.ContributorsWithoutDatanet.selector));
    }

    function test_registerAdapter_revertsOnUnknownDatanet() public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.datanetId = 42;
        _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.UnknownDatanet.selector, 42));
    }

    function test_updateContent_bumpsVersion() public {
        uint256 id = _register(_params());
        vm.warp(20_000);
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterContentUpdated(id, 2, "file:///v2", bytes32("v2"));
        vm.prank(alice);
        assertEq(reg.updateContent(id, "file:///v2", bytes32("v2")), 2);
        AdapterRegistry.Adapter memory a = reg.getAdapter(id);
        assertEq(a.version, 2);
        assertEq(a.uri, "file:///v2");
        assertEq(a.contentHash, bytes32("v2"));
        assertEq(a.updatedAt, 20_000);
    }

    function test_updateContent_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 1));
        reg.updateContent(1, "u", bytes32("h"));
        uint256 id = _register(_params());
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.NotAdapterOwner.selector, id, bob));
        vm.prank(bob);
        reg.updateContent(id, "u", bytes32("h"));
        vm.startPrank(alice);
        vm.expectRevert(AdapterRegistry.EmptyString.selector);
        reg.updateContent(id, "", bytes32("h"));
        vm.expectRevert(AdapterRegistry.ZeroContentHash.selector);
        reg.updateContent(id, "u", 0);
        reg.deactivateAdapter(id);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.AdapterInactive.selector, id));
        reg.updateContent(id, "u", bytes32("h"));
        vm.stopPrank();
    }

    function test_updatePrice_bumpsVersion() public {
        uint256 id = _register(_params());
        vm.prank(alice);
        reg.updateContent(id, "file:///v2", bytes32("v2"));
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterPriceUpdated(id, 3, 7, 9);
        vm.prank(alice);
        assertEq(reg.updatePrice(id, 7, 9), 3);
        AdapterRegistry.Adapter memory a = reg.getAdapter(id);
        assertEq(a.version, 3);
        assertEq(a.pricePerMInput, 7);
        assertEq(a.pricePerMOutput, 9);
    }

    function test_updatePrice_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 1));
        reg.updatePrice(1, 1, 1);
        uint256 id = _register(_params());
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.NotAdapterOwner.selector, id, bob));
        vm.prank(bob);
        reg.updatePrice(id, 1, 1);
        vm.startPrank(alice);
        reg.deactivateAdapter(id);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.AdapterInactive.selector, id));
        reg.updatePrice(id, 1, 1);
        vm.stopPrank();
    }

    function test_deactivateAdapter_flagsAndEmits() public {
        uint256 id = _register(_params());
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterDeactivated(id);
        vm.prank(alice);
        reg.deactivateAdapter(id);
        assertFalse(reg.getAdapter(id).active);
    }

    function test_deactivateAdapter_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 1));
        reg.deactivateAdapter(1);
        uint256 id = _register(_params());
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.NotAdapterOwner.selector, id, bob));
        vm.prank(bob);
        reg.deactivateAdapter(id);
        vm.startPrank(alice);
        reg.deactivateAdapter(id);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.AdapterInactive.selector, id));
        reg.deactivateAdapter(id);
        vm.stopPrank();
    }

    function test_transferAdapter_movesOwnership() public {
        uint256 id = _register(_params());
        vm.expectEmit(address(reg));
        emit AdapterRegistry.AdapterTransferred(id, alice, bob);
        vm.prank(alice);
        reg.transferAdapter(id, bob);
        assertEq(reg.ownerOf(id), bob);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.NotAdapterOwner.selector, id, alice));
        vm.prank(alice);
        reg.updatePrice(id, 1, 1);
    }

    function test_transferAdapter_reverts() public {
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 1));
        reg.transferAdapter(1, bob);
        uint256 id = _register(_params());
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.NotAdapterOwner.selector, id, bob));
        vm.prank(bob);
        reg.transferAdapter(id, bob);
        vm.startPrank(alice);
        vm.expectRevert(AdapterRegistry.ZeroAddress.selector);
        reg.transferAdapter(id, address(0));
        reg.deactivateAdapter(id);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.AdapterInactive.selector, id));
        reg.transferAdapter(id, bob);
        vm.stopPrank();
    }

    function test_reads_revertForUnknown() public {
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 9));
        reg.getAdapter(9);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 9));
        reg.ownerOf(9);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 9));
        reg.quote(9, 1, 1);
    }

    function test_adaptersByBaseModel_indexes() public {
        AdapterRegistry.AdapterParams memory p = _params();
        _register(p);
        p.baseModel = "other-model";
        _register(p);
        p.baseModel = "smollm2-135m-instruct";
        _register(p);
        uint256[] memory ids = reg.adaptersByBaseModel("smollm2-135m-instruct");
        assertEq(ids.length, 2);
        assertEq(ids[0], 1);
        assertEq(ids[1], 3);
        assertEq(reg.adaptersByBaseModel("other-model").length, 1);
        assertEq(reg.adaptersByBaseModel("none").length, 0);
    }

    function test_getAdapters_pages() public {
        AdapterRegistry.AdapterParams memory p = _params();
        for (uint256 i = 0; i < 5; ++i) {
            _register(p);
        }
        assertEq(reg.getAdapters(1, 2).length, 2);
        assertEq(reg.getAdapters(0, 10).length, 5); // 0 reads as 1
        AdapterRegistry.Adapter[] memory tail = reg.getAdapters(4, 10);
        assertEq(tail.length, 2);
        assertEq(tail[0].owner, alice);
        assertEq(reg.getAdapters(6, 10).length, 0);
        assertEq(reg.getAdapters(3, 0).length, 0);
    }

    function test_quote_roundsUp() public {
        uint256 id = _register(_params()); // 1.0 per M in, 3.0 per M out (base units per token: 1 and 3)
        assertEq(reg.quote(id, 100, 50), 250);
        vm.prank(alice);
        reg.updatePrice(id, 1, 0);
        assertEq(reg.quote(id, 1, 0), 1); // 1e-6 rounds up to 1
        assertEq(reg.quote(id, 0, 0), 0);
        assertEq(reg.quote(id, 1_000_000, 0), 1);
        assertEq(reg.quote(id, 1_000_001, 0), 2);
    }

    function testFuzz_registerAdapter_splitMustSumTo10000(uint16 o, uint16 c, uint16 op) public {
        AdapterRegistry.AdapterParams memory p = _params();
        p.ownerBps = o;
        p.contributorsBps = c;
        p.operatorBps = op;
        if (uint256(o) + c + op != 10_000) {
            _expectRegisterRevert(p, abi.encodeWithSelector(AdapterRegistry.BadSplit.selector, o, c, op));
        } else {
            uint256 id = _register(p);
            AdapterRegistry.Adapter memory a = reg.getAdapter(id);
            assertEq(uint256(a.ownerBps) + a.contributorsBps + a.operatorBps, 10_000);
        }
    }

    function testFuzz_registerAdapter_validSplits(uint16 o, uint16 c) public {
        o = uint16(bound(o, 0, 10_000));
        c = uint16(bound(c, 0, 10_000 - o));
        AdapterRegistry.AdapterParams memory p = _params();
        (p.ownerBps, p.contributorsBps, p.operatorBps) = (o, c, 10_000 - o - c);
        uint256 id = _register(p);
        assertEq(reg.getAdapter(id).operatorBps, 10_000 - o - c);
    }

    function testFuzz_quote_isCeilOfExactCost(uint64 inTok, uint64 outTok, uint128 pIn, uint128 pOut) public {
        uint256 id = _register(_params());
        vm.prank(alice);
        reg.updatePrice(id, pIn, pOut);
        uint256 micros = uint256(inTok) * pIn + uint256(outTok) * pOut;
        uint256 q = reg.quote(id, inTok, outTok);
        assertGe(q * 1_000_000, micros);
        if (q > 0) assertLt((q - 1) * 1_000_000, micros);
    }
}
