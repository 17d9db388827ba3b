// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Fixture} from "./utils/Fixture.sol";
import {UsageSettlement} from "../src/UsageSettlement.sol";

/// @dev Gas of settleBatch by batch shape, with ceilings as a regression guard.
///      `forge test --match-contract SettleGas -vv` prints the measurements.
contract SettleGasTest is Fixture {
    function _measure(uint256 nPayers, uint256 nPayees) internal returns (uint256 used) {
        UsageSettlement.Debit[] memory ds = new UsageSettlement.Debit[](nPayers);
        for (uint256 i = 0; i < nPayers; ++i) {
            uint256 key = uint256(keccak256(abi.encode("gas-payer", i)));
            address who = vm.addr(key);
            fund(who, 1_000_000);
            ds[i] = debit(key, 10_000, 10_000);
        }
        UsageSettlement.Credit[] memory cs = new UsageSettlement.Credit[](nPayees);
        uint256 total = nPayers * 10_000;
        for (uint256 j = 0; j < nPayees; ++j) {
            cs[j] = UsageSettlement.Credit({payee: vm.addr(5000 + j), amount: j + 1 == nPayees ? total - (total / nPayees) * j : total / nPayees});
        }
        bytes32 root = freshRoot();
        bytes32 batchId = settlement.computeBatchId(nodeId, root);
        vm.prank(signer);
        uint256 before = gasleft();
        settlement.settleBatch(nodeId, batchId, root, 100, ds, cs);
        used = before - gasleft();
        emit log_named_uint(string.concat("settleBatch payers x payees = ", _s(nPayers), " x ", _s(nPayees)), used);
    }

    function _s(uint256 x) internal pure returns (string memory) {
        if (x == 0) return "0";
        bytes memory b;
        while (x > 0) {
            b = abi.encodePacked(bytes1(uint8(48 + x % 10)), b);
            x /= 10;
        }
        return string(b);
    }

    function test_gas_settle_1x3() public {
        assertLt(_measure(1, 3), 210_000);
    }

    function test_gas_settle_10x12() public {
        assertLt(_measure(10, 12), 800_000);
    }

    function test_gas_settle_50x50() public {
        assertLt(_measure(50, 50), 3_400_000);
    }

    function test_gas_claim() public {
        fund(payer, 1_000);
        settle(oneDebit(payerKey, 1_000, 1_000), oneCredit(operator, 1_000));
        vm.prank(operator);
        uint256 before = gasleft();
        settlement.claim();
        uint256 used = before - gasleft();
        emit log_named_uint("claim", used);
        assertLt(used, 40_000);
    }
}
