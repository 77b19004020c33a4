from octaskly.cli import main

raise SystemExit(main.main())
