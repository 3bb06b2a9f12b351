from facepay.cli import main

main()
