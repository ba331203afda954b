"""The functional core of lbagent: hashing, tables, ownership, decisions. No I/O, no clocks."""
