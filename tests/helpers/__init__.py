"""What several test files share: models as training leaves them, files, the command line, a PostgreSQL server."""
