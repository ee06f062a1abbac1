"""``python -m viewer`` runs the desktop viewer."""

from viewer.app import main

raise SystemExit(main())
