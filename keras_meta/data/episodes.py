"""Episode vocabulary shared by every episode source."""

EPISODE_KEYS = ("support_x", "support_y", "query_x", "query_y")
