// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @dev Receives the hooks of HookToken (an ERC-777-style token).
interface ITokenHooks {
    function tokensToSend(address from, address to, uint256 amount) external;
    function tokensReceived(address from, address to, uint256 amount) external;
}

/// @dev A malicious-by-design ERC-20 that calls into the sender before and into the recipient after every
///      transfer when they registered for hooks, as ERC-777 does: the classic re-entrancy vector.
contract HookToken is ERC20 {
    mapping(address => bool) public hooked;

    constructor() ERC20("Hook", "HOOK") {}

    function registerHooks() external {
        hooked[msg.sender] = true;
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function _update(address from, address to, uint256 value) internal override {
        if (hooked[from]) ITokenHooks(from).tokensToSend(from, to, value);
        super._update(from, to, value);
        if (hooked[to]) ITokenHooks(to).tokensReceived(from, to, value);
    }
}
