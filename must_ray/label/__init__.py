"""Step 2 of MuST: teacher actors pseudo-label an unlabelled image pool with Ray Data, exactly once."""
