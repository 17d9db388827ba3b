"""The chain side of the node: contract artifacts, a local anvil, deployment, and typed contract calls.

    artifacts   ABI + bytecode exported from forge (node/chain/artifacts/<Contract>.json)
    anvil       start/stop/wait for a local anvil (npm @foundry-rs/anvil)
    deploy      deploy every contract; the deployment file (chain id, addresses, block)
    client      ChainClient: typed wrappers of the registry and settlement calls
    tx          signing, sending and revert decoding
    errors      the ChainError family
"""
