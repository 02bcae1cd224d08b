"""The imagestream command line: runs services, the local pipeline and admin tasks."""
