// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title TestToken
/// @notice A freely mintable ERC-20 for local development chains (anvil, chain id 31337 or 1337).
///         Deploying it anywhere else reverts, so it can never pose as money on a public network.
contract TestToken is ERC20 {
    /// @notice This token only deploys on local chains; `chainId` is not one.
    error NotALocalChain(uint256 chainId);

    uint8 private immutable _decimals;

    /// @param name_ token name
    /// @param symbol_ token symbol
    /// @param decimals_ decimals shown by wallets
    constructor(string memory name_, string memory symbol_, uint8 decimals_) ERC20(name_, symbol_) {
        if (block.chainid != 31337 && block.chainid != 1337) revert NotALocalChain(block.chainid);
        _decimals = decimals_;
    }

    /// @notice Mints `amount` to `to`; anyone may call it (local chains only).
    /// @param to the recipient
    /// @param amount base units
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Decimals shown by wallets.
    /// @return the decimals given at deployment
    function decimals() public view override returns (uint8) {
        return _decimals;
    }
}
