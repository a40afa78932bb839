"""The on-policy distillation learner: sample from the student, score with the teacher, step on reverse KL."""
