"""Acting on scores: exact thresholds and top fractions (select), kept rows and uid lists (filter, uids),
and new shards of the kept samples (reshard)."""
