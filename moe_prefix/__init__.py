"""moe_prefix: prefix tuning with a mixture of prefix experts."""
