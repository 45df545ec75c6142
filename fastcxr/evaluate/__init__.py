"""After training: statistics (`stats`), per-finding metrics (`metrics`), a run's evaluation
with confidence intervals and paired tests (`evaluation`), a run applied to another dataset
(`external`), subgroup audits (`audit`), figures (`figures`) and the report (`report`)."""
