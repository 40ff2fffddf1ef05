from simscale.cli import main

raise SystemExit(main())
