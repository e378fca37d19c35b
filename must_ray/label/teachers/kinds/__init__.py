"""One module per teacher kind, each registering a :class:`~must_ray.label.teachers.base.TeacherKind`
with :func:`~must_ray.label.teachers.base.register_teacher_kind`; every module here (except those
starting with ``_``) is discovered on first use."""
