-- Version 2: a client's totals over a period (what budgets read at
-- startup, and GET /usage) without scanning every client's rows.
CREATE INDEX usage_daily_client_day ON usage_daily (client, day);
