"""After step 3: score models per task, compare the student with its teachers, probe transfer."""
