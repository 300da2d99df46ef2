"""`python -m gradwatch_service` is `gradwatch`."""

from gradwatch.cli import main

raise SystemExit(main())
