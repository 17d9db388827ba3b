"""HTTP routers, one module per resource. Each module in ROUTER_MODULES exposes `router`;
node.app includes them in this order."""

ROUTER_MODULES = (
    "node.api.health",
    "node.api.openai",
    "node.api.admin",
    "node.api.auth",
    "node.api.receipts",
    "node.api.rewards",
    "node.api.usage",
    "node.api.settlements",
    "node.api.dashboard",
)
