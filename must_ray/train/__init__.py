"""Steps 1 and 3 of MuST: one Ray Train loop trains a teacher (one task, real labels) and the
student (every task, pseudo labels, optionally mixed with real ones)."""
