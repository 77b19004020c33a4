<#
.SYNOPSIS
  octaskly installer for Windows: the zipapp under Program Files, a secret, a config and a
  Windows service running `python octaskly.pyz dispatcher|worker`.

.DESCRIPTION
  Run in an elevated PowerShell (5.1 or 7):
    .\install.ps1 -Role dispatcher -Pyz .\octaskly.pyz
    .\install.ps1 -Role worker -DispatcherAddr dispatcher.lan:5555 -Name w1 -SecretFile .\secret -Pyz .\octaskly.pyz
    .\install.ps1 -Uninstall [-Purge]

  Layout:
    %ProgramFiles%\octaskly\octaskly.pyz        the zipapp (SHA-256 checked against a
                                                SHA256SUMS beside it; refused on mismatch)
    %ProgramFiles%\octaskly\shiv\               its dependencies, pre-extracted (SHIV_ROOT)
    %ProgramData%\octaskly\octaskly.toml        from `octaskly config init`, only if missing
    %ProgramData%\octaskly\secret               32 random bytes (hex), made once, never
                                                overwritten; readable by Administrators and
                                                SYSTEM only
    %ProgramData%\octaskly\data\                database, audit log, TLS files, admin token
  Service "octaskly-dispatcher" or "octaskly-worker-NAME" (automatic start, LocalSystem; the
  service's environment — SHIV_ROOT, OCTASKLY_SECRET_KEY_FILE — is set in its registry key).

  The pyz needs a CPython of the version it was built for (python.exe on PATH, or -Python).
  Without -Pyz the release is downloaded from $ReleaseUrl (octaskly.pyz and SHA256SUMS,
  which is then mandatory).

  NOT TESTED: this script could not be run where it was written (no Windows machine).
  Windows services normally have to talk to the service control manager; octaskly does
  not, so the service is created through sc.exe around python.exe. If the service fails to
  start with error 1053, wrap it with a service host such as NSSM or WinSW (same
  command line and environment).
#>
[CmdletBinding()]
param(
    [ValidateSet('dispatcher', 'worker')] [string] $Role = 'dispatcher',
    [string] $DispatcherAddr = '',
    [string] $Name = $env:COMPUTERNAME,
    [string] $Pyz = '',
    [string] $SecretFile = '',
    [string] $Python = 'python.exe',
    [string] $ReleaseUrl = $(if ($env:OCTASKLY_RELEASE_URL) { $env:OCTASKLY_RELEASE_URL } else { 'https://github.com/adauldev/octaskly/releases/latest/download' }),
    [switch] $NoStart,
    [switch] $Uninstall,
    [switch] $Purge
)
$ErrorActionPreference = 'Stop'

$Prefix = Join-Path $env:ProgramFiles 'octaskly'
$Shiv = Join-Path $Prefix 'shiv'
$Etc = Join-Path $env:ProgramData 'octaskly'
$Data = Join-Path $Etc 'data'
$Config = Join-Path $Etc 'octaskly.toml'
$Secret = Join-Path $Etc 'secret'
$Service = if ($Role -eq 'dispatcher') { 'octaskly-dispatcher' } else { "octaskly-worker-$Name" }

function Say($msg) { Write-Host "install.ps1: $msg" }

$principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'run this script in an elevated (Administrator) PowerShell'
}

function Restrict-Acl($path) {
    # only SYSTEM (the service) and Administrators
    & icacls.exe $path /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "icacls failed on $path" }
}

if ($Uninstall) {
    Get-Service -Name 'octaskly-*' -ErrorAction SilentlyContinue | ForEach-Object {
        Stop-Service -Name $_.Name -Force -ErrorAction SilentlyContinue
        & sc.exe delete $_.Name | Out-Null
        Say "removed service $($_.Name)"
    }
    if (Test-Path $Prefix) { Remove-Item -Recurse -Force $Prefix; Say "removed $Prefix" }
    if ($Purge) {
        if (Test-Path $Etc) { Remove-Item -Recurse -Force $Etc; Say "purged $Etc" }
    } else {
        Say "kept $Etc (configuration, secret, data; -Purge removes it)"
    }
    return
}

$py = (Get-Command $Python -ErrorAction Stop).Source

# 1. the zipapp, verified
$work = Join-Path ([IO.Path]::GetTempPath()) ("octaskly-install-" + [guid]::NewGuid())
New-Item -ItemType Directory -Path $work | Out-Null
try {
    if ($Pyz) {
        $Pyz = (Resolve-Path $Pyz).Path
        $sums = Join-Path (Split-Path $Pyz) 'SHA256SUMS'
        if (-not (Test-Path $sums)) { Say "warning: no SHA256SUMS beside $Pyz; its checksum is not verified" }
    } else {
        Say "downloading $ReleaseUrl/octaskly.pyz"
        $Pyz = Join-Path $work 'octaskly.pyz'
        $sums = Join-Path $work 'SHA256SUMS'
        Invoke-WebRequest -UseBasicParsing -Uri "$ReleaseUrl/octaskly.pyz" -OutFile $Pyz
        Invoke-WebRequest -UseBasicParsing -Uri "$ReleaseUrl/SHA256SUMS" -OutFile $sums
    }
    if (Test-Path $sums) {
        $leaf = Split-Path $Pyz -Leaf
        $entry = Get-Content $sums | Where-Object { ($_ -split '\s+')[1] -replace '^\*', '' -eq $leaf } | Select-Object -First 1
        if (-not $entry) { throw "$sums has no entry for ${leaf}: refusing to install it" }
        $want = ($entry -split '\s+')[0].ToLower()
        $got = (Get-FileHash -Algorithm SHA256 $Pyz).Hash.ToLower()
        if ($got -ne $want) { throw "SHA-256 mismatch for ${Pyz}: $got, $sums says ${want}: refusing to install it" }
        Say "${leaf}: SHA-256 verified"
    }

    # 2. directories; an upgrade backs the database up first with the installed version
    foreach ($d in @($Prefix, $Etc, $Data, (Join-Path $Etc 'backups'))) {
        if (-not (Test-Path $d)) { New-Item -ItemType Directory -Path $d | Out-Null }
    }
    Restrict-Acl $Etc
    $target = Join-Path $Prefix 'octaskly.pyz'
    $changed = -not (Test-Path $target) -or ((Get-FileHash $target).Hash -ne (Get-FileHash $Pyz).Hash)
    $existing = Get-Service -Name $Service -ErrorAction SilentlyContinue
    if ($changed -and (Test-Path $target) -and (Test-Path (Join-Path $Data 'octaskly.db'))) {
        $out = Join-Path $Etc ("backups\pre-upgrade-" + (Get-Date).ToUniversalTime().ToString('yyyyMMddTHHmmssZ') + '.db')
        Say "upgrade: backing up the database to $out"
        $env:SHIV_ROOT = $Shiv
        & $py $target backup --db-path (Join-Path $Data 'octaskly.db') --output $out
        if ($LASTEXITCODE -ne 0) { throw 'backup failed: upgrade stopped, nothing changed' }
    }
    if ($changed) {
        if ($existing) { Stop-Service -Name $Service -Force }
        Copy-Item -Force $Pyz $target
        if (Test-Path $Shiv) { Remove-Item -Recurse -Force $Shiv }
        $env:SHIV_ROOT = $Shiv
        & $py $target --version | Out-Null   # pre-extracts into SHIV_ROOT
        if ($LASTEXITCODE -ne 0) { throw "$target does not run with $py (it needs the CPython version it was built with)" }
        & $py -m compileall -q $Shiv | Out-Null
        Say "installed $target"
    }
    $env:SHIV_ROOT = $Shiv

    # 3. the secret: made once, never overwritten
    if (-not (Test-Path $Secret)) {
        if ($SecretFile) {
            Copy-Item $SecretFile $Secret
        } else {
            $bytes = New-Object byte[] 32
            [Security.Cryptography.RandomNumberGenerator]::Create().GetBytes($bytes)
            [IO.File]::WriteAllText($Secret, (($bytes | ForEach-Object { $_.ToString('x2') }) -join ''))
            if ($Role -eq 'worker') { Say "warning: a worker needs the dispatcher's secret: copy it to $Secret" }
        }
        Say "wrote $Secret"
    }

    # 4. the configuration: only if missing
    if (-not (Test-Path $Config)) {
        $tmp = Join-Path $work 'octaskly.toml'
        & $py $target config init --output $tmp | Out-Null
        if ($LASTEXITCODE -ne 0) { throw 'octaskly config init failed' }
        $text = (Get-Content -Raw $tmp)
        $text = $text -replace '(?m)^# secret_key_file = .*$', ('secret_key_file = ''' + $Secret + '''')
        $text = $text -replace '(?m)^# data_dir = .*$', ('data_dir = ''' + $Data + '''')
        if ($Role -eq 'worker' -and $DispatcherAddr) {
            $text = $text -replace '(?m)^dispatcher_addr = \[\]', ('dispatcher_addr = ["' + $DispatcherAddr + '"]')
        }
        [IO.File]::WriteAllText($tmp, $text)
        & $py $target config check $tmp | Out-Null
        if ($LASTEXITCODE -ne 0) { throw 'the generated configuration is invalid' }
        Copy-Item $tmp $Config
        Say "wrote $Config"
    }

    # 5. the service: python.exe octaskly.pyz ..., environment in the service's registry key
    $svcArgs = if ($Role -eq 'dispatcher') {
        "dispatcher --config `"$Config`" --data-dir `"$Data`""
    } else {
        "worker --config `"$Config`" --name $Name"
    }
    $binPath = "`"$py`" `"$target`" $svcArgs"
    if (-not $existing) {
        New-Service -Name $Service -BinaryPathName $binPath -DisplayName "octaskly $Role $(if ($Role -eq 'worker') { $Name })" `
            -StartupType Automatic -Description 'octaskly distributed task runner' | Out-Null
        & sc.exe failure $Service reset= 86400 actions= restart/10000/restart/10000/restart/60000 | Out-Null
        Say "created service $Service"
    } else {
        & sc.exe config $Service binPath= $binPath | Out-Null
    }
    $key = "HKLM:\SYSTEM\CurrentControlSet\Services\$Service"
    New-ItemProperty -Path $key -Name Environment -PropertyType MultiString -Force -Value @(
        "SHIV_ROOT=$Shiv", "OCTASKLY_SECRET_KEY_FILE=$Secret"
    ) | Out-Null

    if (-not $NoStart) {
        Restart-Service -Name $Service -ErrorAction SilentlyContinue
        if ((Get-Service -Name $Service).Status -ne 'Running') { Start-Service -Name $Service }
        Say "started $Service"
    } else {
        Say "service not started: Start-Service $Service"
    }
} finally {
    Remove-Item -Recurse -Force $work -ErrorAction SilentlyContinue
}
