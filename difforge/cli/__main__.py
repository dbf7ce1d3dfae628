from difforge.cli.app import main

main()
