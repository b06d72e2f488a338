"""Everything the operator creates on a cluster, as pure functions of the FineTuneJob."""
