"""
The usage ledger: what every finished request used and cost, kept in
SQLite or PostgreSQL through L{twisted.enterprise.adbapi}, off the request
path (L{oaiproxy.ledger.writer}); the prices it costs tokens at
(L{oaiproxy.ledger.prices}); the report read from it
(L{oaiproxy.ledger.report}).

It reads the records of L{oaiproxy.observe}; the budgets of
L{oaiproxy.access} read period totals from it.
"""
